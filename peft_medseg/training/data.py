"""Inputs of the recipes: a multi-center dataset from a name or path, the validation split, seeded augmentation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict

from ..data import SegmentationTransform, center_names, few_shot_subset, hash_split, select_centers
from ..data.transforms import AugmentationConfig

SYNTHETIC = "synthetic"


def load_multicenter_dataset(
    dataset: str, centers: Sequence[str] | None = None, num_labels: int | None = None
) -> tuple[DatasetDict, dict[int, str]]:
    """A train/test `DatasetDict` (columns image, label, center, case_id) and its id2label.

    `dataset` is `"synthetic"` (the embedded simulated brain MRI, generated and cached on first use), a local folder
    (`<root>/<center>/images|masks`) or anything `datasets` loads (a `save_to_disk` folder or a Hub id). Without
    `num_labels`, folder and Hub datasets count labels from the largest id in the train masks.
    """
    if dataset == SYNTHETIC:
        from ..data.synthetic import ID2LABEL, load_synthetic_mri

        return load_synthetic_mri(centers=list(centers) if centers else None), dict(ID2LABEL)
    path = Path(dataset)
    if path.is_dir() and any((child / "images").is_dir() for child in path.iterdir()):
        from ..data import load_folder_dataset

        data = load_folder_dataset(path, centers=centers, num_labels=num_labels)
    else:
        from ..data import load_hf_segmentation_dataset

        data = load_hf_segmentation_dataset(dataset, centers=centers, num_labels=num_labels)
    if num_labels is None:
        num_labels = 1 + max(int(np.asarray(label).max()) for label in data["train"]["label"])
        num_labels = max(num_labels, 2)
    return data, {i: str(i) for i in range(num_labels)}


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


def restrict_centers(data: DatasetDict, centers: Sequence[str] | None) -> DatasetDict:
    """`data` with only `centers` (all when None)."""
    return data if not centers else select_centers(data, list(centers))


def train_transform(image_processor, seed: int = 0, augmentation: AugmentationConfig | None = None):
    """The augmenting preprocessing of training rows, seeded per sample (see `SegmentationTransform`)."""
    return SegmentationTransform(image_processor, train=True, augmentation=augmentation, seed=seed)


def eval_transform(image_processor) -> SegmentationTransform:
    """The deterministic preprocessing of validation and test rows."""
    return SegmentationTransform(image_processor, train=False)


__all__ = [
    "SYNTHETIC",
    "center_names",
    "eval_transform",
    "load_multicenter_dataset",
    "restrict_centers",
    "split_validation",
    "train_transform",
]
