"""Segmentation metrics: plain functions (`functional`) and local `evaluate` modules shipped in this package."""

from __future__ import annotations

from pathlib import Path

from .functional import (
    aggregate_by_center,
    dice_per_class,
    hd95,
    hd95_binary,
    iou_per_class,
    mean_foreground,
    overlap_counts,
    segmentation_report,
    stack_slices,
    surface_distances,
    volume_dice,
)

# Each shipped evaluate module is a folder holding `<name>.py`; `evaluate.load(folder)` works offline.
METRIC_NAMES = ("dice", "hd95", "volume_dice")


def metric_path(name: str) -> str:
    """Filesystem path of a shipped evaluate module folder, for `evaluate.load(metric_path("dice"))`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}: expected one of {list(METRIC_NAMES)}.")
    return str(Path(__file__).parent / name)


def load_metric(name: str, **kwargs):
    """Load a shipped metric (`dice`, `hd95` or `volume_dice`) with `evaluate.load`, offline, from its folder."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)


__all__ = [
    "METRIC_NAMES",
    "aggregate_by_center",
    "dice_per_class",
    "hd95",
    "hd95_binary",
    "iou_per_class",
    "load_metric",
    "mean_foreground",
    "metric_path",
    "overlap_counts",
    "segmentation_report",
    "stack_slices",
    "surface_distances",
    "volume_dice",
]
