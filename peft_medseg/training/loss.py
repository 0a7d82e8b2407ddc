"""Segmentation loss: cross-entropy plus soft Dice, with MONAI's Dice."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss


def segmentation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    dice_weight: float = 1.0,
    ignore_index: int = 255,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy + `dice_weight` x soft Dice loss (1 - mean soft Dice over samples and foreground classes).

    `logits` (B, C, h, w) are resized to the labels' (B, H, W) size when they differ. Computed in float32 under mixed
    precision. Soft Dice (`monai.losses.MaskedDiceLoss` on softmax probabilities, smoothing `smooth` above and below)
    is computed per sample and then averaged, so the loss of a batch equals the mean of the losses of its halves:
    data-parallel training on two processes matches one process with the doubled batch.

    Not `monai.losses.DiceCELoss`: it has no `ignore_index`, and pixels labelled `ignore_index` (255) must count in
    neither term. Here they are left out of the cross-entropy and masked out of the Dice.
    """
    logits = logits.float()
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    cross_entropy = F.cross_entropy(logits, labels, ignore_index=ignore_index)
    if dice_weight == 0:
        return cross_entropy
    num_classes = logits.shape[1]
    valid = (labels != ignore_index).unsqueeze(1)
    # Foreground classes only when there is a background: it dominates the pixels and would mask the rest.
    dice = MaskedDiceLoss(
        include_background=num_classes == 1,
        to_onehot_y=True,
        softmax=True,
        smooth_nr=smooth,
        smooth_dr=smooth,
        batch=False,
    )
    targets = torch.where(valid, labels.unsqueeze(1), 0)
    return cross_entropy + dice_weight * dice(logits, targets, mask=valid.float())
