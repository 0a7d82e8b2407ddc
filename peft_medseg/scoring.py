"""Scoring a segmentation model per center: predictions, Dice and HD95 per image or volume, per-center means.

Cells hold the mean foreground Dice (per image or volume, then averaged per center) and HD95: in pixels of the model
input for images, in millimetres for volumes (their voxel spacing). Volumes are segmented whole by sliding-window
inference over the model's patch size (MONAI, Gaussian blending). Classes that occur in no reference and no
prediction of a center are left out of its means and listed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from datasets import Dataset
from monai.inferers import sliding_window_inference
from torch import nn
from torch.utils.data import DataLoader

from .data import collate_segmentation
from .data.volumes import is_volume_batch
from .metrics import dice_per_class, hd95, overlap_counts
from .models3d import is_volume_model, volume_num_labels, volume_roi_size


def segmentation_logits(model: nn.Module, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
    """The logits of a transformers segmentation model (`.logits` of its output) or a 3D model (its output)."""
    output = model(pixel_values=pixel_values, **kwargs)
    return output.logits if hasattr(output, "logits") else output


@torch.no_grad()
def volume_logits(
    model: nn.Module, volume: torch.Tensor, adapter_name: str | None = None, overlap: float = 0.25
) -> torch.Tensor:
    """Logits (num_labels, D, H, W) of a whole volume (C, D, H, W): MONAI's sliding-window inference over the model's
    patch size (`volume_roi_size`), windows overlapping by `overlap` and blended with Gaussian weights."""
    kwargs = {"adapter_names": [adapter_name]} if adapter_name is not None else {}
    return sliding_window_inference(
        volume[None],
        roi_size=volume_roi_size(model),
        sw_batch_size=1,
        predictor=lambda window: segmentation_logits(model, window, **kwargs),
        overlap=overlap,
        mode="gaussian",
    )[0]


@torch.no_grad()
def predict(
    model: nn.Module,
    pixel_values: torch.Tensor,
    adapter_names: Sequence[str] | None = None,
    overlap: float = 0.25,
) -> torch.Tensor:
    """Predicted label maps (B, H, W) or (B, D, H, W) at the input size; `adapter_names` routes each row of a peft
    model. Volumes go through MONAI's sliding-window inference over the model's patch size (`volume_roi_size`),
    windows overlapping by `overlap` and blended with Gaussian weights, one volume at a time."""
    kwargs = {"adapter_names": list(adapter_names)} if adapter_names is not None else {}
    if is_volume_batch(pixel_values):
        names = list(adapter_names) if adapter_names is not None else [None] * len(pixel_values)
        return torch.stack(
            [volume_logits(model, volume, name, overlap).argmax(dim=0) for volume, name in zip(pixel_values, names)]
        )
    logits = segmentation_logits(model, pixel_values, **kwargs)
    if logits.shape[-2:] != pixel_values.shape[-2:]:
        logits = torch.nn.functional.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear")
    return logits.argmax(dim=1)


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    dataset: Dataset,
    num_labels: int,
    batch_size: int = 16,
    adapter_for_center: Callable[[str], str] | None = None,
    compute_hd95: bool = True,
    ignore_index: int = 255,
) -> dict[str, dict[str, float | list[int] | list[float]]]:
    """Per-center scores `{center: {"dice", "hd95", "absent_classes", "dice_per_class", "dice_aggregated",
    "dice_per_image"}}` of `model` on a transformed dataset.

    `dataset` rows have `pixel_values`, `labels` and `center` (a `set_transform`ed split); volume rows also have
    `spacing` (mm), in which their HD95 is measured, and are scored one whole volume at a time. Each image scores the mean
    Dice over the foreground classes of its center (a class absent from both prediction and reference of that image
    scores 1) and the mean HD95 over those where it is defined (NaN when none is); centers average their images.
    A class that appears in no reference and no prediction of a center is left out of that center's means, and
    listed in `absent_classes`: it would otherwise add a perfect 1 to every image and inflate the score.
    `dice_per_image` is each image's score in dataset order (what `dice` averages), for paired comparisons of two
    models on the same images.
    Per foreground class id, `dice_per_class` is that class's mean over the center's images (same conventions), and
    `dice_aggregated` pools the center's voxels, `2 Σ|P∩R| / Σ(|P|+|R|)` (HECKTOR's DSCagg): a case without a
    small lesion then adds nothing rather than a 1 (NaN for a class in no reference or prediction).
    With `adapter_for_center`, each row is routed through the adapter named for its center in one mixed batch.
    The model is put in eval mode, and put back in its previous mode afterwards.

    Raises a `ValueError` when the model predicts another number of classes than `num_labels`, or a reference
    holds a label id outside `0..num_labels-1` (other than `ignore_index`), naming the center and the row.
    """
    model_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if is_volume_model(model):
        model_labels, batch_size = volume_num_labels(model), 1  # whole volumes differ in size: one at a time
    if model_labels is not None and model_labels != num_labels:
        raise ValueError(f"the model predicts {model_labels} classes, but the scores were asked for {num_labels}.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_segmentation)
    dice_scores, hd95_scores, centers = [], [], []
    overlaps: dict[str, np.ndarray] = {}  # per center: (2, num_labels) voxels in both, voxels of the two added
    present: dict[str, np.ndarray] = {}  # per center: which classes occur in some reference or prediction
    row = 0
    for batch in loader:
        names = [adapter_for_center(c) for c in batch["center"]] if adapter_for_center else None
        predictions = predict(model, batch["pixel_values"].to(device), names).cpu().numpy()
        references = batch["labels"].numpy()
        ids = batch.get("id") or batch.get("case_id") or [str(row + i) for i in range(len(references))]
        spacings = batch.get("spacing") or [None] * len(references)
        for prediction, reference, center, sample, spacing in zip(
            predictions, references, batch["center"], ids, spacings
        ):
            values = np.unique(reference)
            bad = values[((values < 0) | (values >= num_labels)) & (values != ignore_index)]
            if bad.size:
                raise ValueError(
                    f"center {center!r}, sample {sample!r}: reference label {int(bad[0])} outside 0..{num_labels - 1}; "
                    "the data's label set does not match the model's num_labels."
                )
            seen = present.setdefault(center, np.zeros(num_labels, dtype=bool))
            seen[np.unique(prediction[(prediction >= 0) & (prediction < num_labels)])] = True
            seen[values[(values >= 0) & (values < num_labels)]] = True
            dice_scores.append(dice_per_class(prediction, reference, num_labels, ignore_index))
            counts = np.stack(overlap_counts(prediction, reference, num_labels, ignore_index))
            overlaps[center] = overlaps.get(center, 0) + counts
            if compute_hd95:
                # Volumes in mm; 2D images in pixels of the model input (a slice's spacing is the volume's, not theirs).
                in_mm = spacing if prediction.ndim == 3 else None
                hd95_scores.append(hd95(prediction, reference, num_labels, in_mm, ignore_index=ignore_index))
            centers.append(center)
        row += len(references)
    model.train(was_training)
    scores = {}
    for center in sorted(present, key=str):
        rows = [i for i, c in enumerate(centers) if c == center]
        kept = [label for label in range(1, num_labels) if present[center][label]]
        absent = [label for label in range(1, num_labels) if not present[center][label]]
        dice_per_image = _per_image_of_kept(dice_scores, rows, kept)
        dice = _nan_mean(dice_per_image)
        hd = _mean_of_kept(hd95_scores, rows, kept) if compute_hd95 else math.nan
        both, added = overlaps[center]
        with np.errstate(invalid="ignore", divide="ignore"):
            aggregated = 2 * both / added
        per_class = {label: _mean_of_kept(dice_scores, rows, [label]) for label in kept}
        scores[str(center)] = {
            "dice": dice,
            "hd95": hd,
            "absent_classes": absent,
            "dice_per_class": {label: per_class.get(label, math.nan) for label in range(1, num_labels)},
            "dice_aggregated": {label: float(aggregated[label]) for label in range(1, num_labels)},
            "dice_per_image": [float(value) for value in dice_per_image],
        }
    return scores


def _per_image_of_kept(per_class: list[np.ndarray], rows: list[int], kept: list[int]) -> np.ndarray:
    """Each of `rows`' NaN-aware mean over the `kept` classes (all NaN when nothing is kept)."""
    if not kept:
        return np.full(len(rows), math.nan)
    table = np.array([per_class[i][kept] for i in rows])  # (images, kept classes)
    with warnings.catch_warnings():  # all-NaN rows (HD95 undefined everywhere) give NaN, as documented
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(table, axis=1)


def _nan_mean(values: np.ndarray) -> float:
    """The NaN-aware mean, NaN (quietly) when every value is NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values))


def _mean_of_kept(per_class: list[np.ndarray], rows: list[int], kept: list[int]) -> float:
    """Mean over `rows` of each row's NaN-aware mean over the `kept` classes (NaN when nothing is kept)."""
    return _nan_mean(_per_image_of_kept(per_class, rows, kept))


def mean_dice(scores: dict[str, dict[str, float]]) -> float:
    """Mean over centers of the per-center Dice: the validation criterion of multi-center training."""
    return float(np.nanmean([value["dice"] for value in scores.values()]))


def json_scores(scores: dict[str, dict]) -> dict[str, dict]:
    """Scores for a JSON file: an undefined value (NaN, e.g. the HD95 of an empty prediction) becomes null."""

    def plain(value):
        if isinstance(value, dict):  # per class: JSON keys are strings
            return {str(key): plain(item) for key, item in value.items()}
        if isinstance(value, list):  # per image
            return [plain(item) for item in value]
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    return {center: {key: plain(value) for key, value in cell.items()} for center, cell in scores.items()}


def absent_classes_note(scores: dict[str, dict]) -> str:
    """A sentence naming the classes left out of the scores because no reference or prediction had them."""
    absent = {c: s.get("absent_classes") for c, s in scores.items() if s.get("absent_classes")}
    if not absent:
        return ""
    listed = "; ".join(f"{center}: {classes}" for center, classes in sorted(absent.items()))
    return f"Classes absent from every reference and prediction, left out of the means: {listed}."


__all__ = [
    "absent_classes_note",
    "evaluate_segmentation",
    "json_scores",
    "mean_dice",
    "predict",
    "segmentation_logits",
    "volume_logits",
]
