"""Inputs of training: the validation split of a center's training rows, and its (seeded) preprocessing."""

from __future__ import annotations

from datasets import Dataset

from ..data import SegmentationTransform, few_shot_subset, hash_split
from ..data.transforms import AugmentationConfig
from ..data.volumes import VolumePreprocessing, VolumeTransform


def split_validation(
    train: Dataset, validation_fraction: float = 0.2, num_train_cases: int | None = None, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """(train, validation) from a train split: a held-out share of each center's cases, chosen by case hash.

    The choice is deterministic and never depends on `seed` or `num_train_cases`, so every method and few-shot size
    is selected on the same validation cases. `num_train_cases` then keeps that many cases per center (few-shot).
    The test split is left for the final evaluation only.
    """
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    sides = hash_split(train["center"], train["case_id"], test_fraction=validation_fraction)
    fit = train.select([i for i, side in enumerate(sides) if side == "train"])
    validation = train.select([i for i, side in enumerate(sides) if side == "test"])
    if len(validation) == 0 or len(fit) == 0:
        raise ValueError(
            f"validation_fraction={validation_fraction} leaves an empty split of {len(train)} training rows: "
            "each center needs at least two cases."
        )
    if num_train_cases is not None:
        fit = few_shot_subset(fit, num_train_cases, seed=seed)
    return fit, validation


def train_transform(image_processor, seed: int = 0, augmentation: AugmentationConfig | None = None):
    """The augmenting preprocessing of training rows, seeded per sample: `SegmentationTransform` for an image
    processor, `VolumeTransform` (random positive/negative patches) for a 3D base's `VolumePreprocessing`."""
    if isinstance(image_processor, VolumePreprocessing):
        return VolumeTransform(image_processor, train=True, seed=seed)
    return SegmentationTransform(image_processor, train=True, augmentation=augmentation, seed=seed)


def eval_transform(image_processor) -> SegmentationTransform | VolumeTransform:
    """The deterministic preprocessing of validation and test rows (whole volumes for a 3D base)."""
    if isinstance(image_processor, VolumePreprocessing):
        return VolumeTransform(image_processor, train=False)
    return SegmentationTransform(image_processor, train=False)


__all__ = ["eval_transform", "split_validation", "train_transform"]
