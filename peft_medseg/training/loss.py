"""Segmentation loss: cross-entropy plus soft Dice."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segmentation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    dice_weight: float = 1.0,
    ignore_index: int = 255,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy + `dice_weight` x soft Dice loss (1 - mean soft Dice over samples and foreground classes).

    `logits` (B, C, h, w) are resized to the labels' (B, H, W) size when they differ. Computed in float32 under mixed
    precision. Soft Dice is computed per sample and then averaged, so the loss of a batch equals the mean of the
    losses of its halves: data-parallel training on two processes matches one process with the doubled batch.
    """
    logits = logits.float()
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    cross_entropy = F.cross_entropy(logits, labels, ignore_index=ignore_index)
    if dice_weight == 0:
        return cross_entropy
    num_classes = logits.shape[1]
    valid = (labels != ignore_index).unsqueeze(1).float()
    probabilities = logits.softmax(dim=1) * valid
    one_hot = F.one_hot(labels.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).float() * valid
    intersection = (probabilities * one_hot).sum(dim=(2, 3))
    denominator = probabilities.sum(dim=(2, 3)) + one_hot.sum(dim=(2, 3))
    dice = (2 * intersection + smooth) / (denominator + smooth)  # (B, C)
    # Foreground classes only when there is a background: it dominates the pixels and would mask the rest.
    dice = dice[:, 1:] if num_classes > 1 else dice
    return cross_entropy + dice_weight * (1.0 - dice.mean())
