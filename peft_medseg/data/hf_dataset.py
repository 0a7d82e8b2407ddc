"""Load any `datasets` dataset (saved to disk, a local data folder, or a Hub id) that has a center column."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, Value, load_dataset, load_from_disk

from .splits import hash_split, select_centers
from .validation import DataValidationError, check_label_values


def _as_array(value) -> np.ndarray:
    return np.asarray(value)


def _validate_rows(
    dataset: Dataset, split: str, source: str, num_labels: int | None, ignore_index: int | None
) -> None:
    for index, row in enumerate(dataset):
        where = f"{source}[{split}][{index}]"
        try:
            image = _as_array(row["image"])
            label = _as_array(row["label"])
        except Exception as error:  # noqa: BLE001 - any decoding failure is reported with the row that caused it
            raise DataValidationError(f"{where}: unreadable image or label ({error}).") from error
        if label.ndim != 2:
            raise DataValidationError(f"{where}: label has shape {label.shape}, expected a 2D map of class ids.")
        if image.shape[:2] != label.shape:
            raise DataValidationError(
                f"{where}: label size {label.shape[1]}x{label.shape[0]} differs from image size "
                f"{image.shape[1]}x{image.shape[0]}."
            )
        check_label_values(label, num_labels, ignore_index, where)


def load_hf_segmentation_dataset(
    path: str | Path,
    center_column: str = "center",
    image_column: str = "image",
    label_column: str = "label",
    case_column: str | None = None,
    centers: Sequence[str] | None = None,
    num_labels: int | None = None,
    ignore_index: int | None = None,
    test_fraction: float = 0.2,
    validate: bool = True,
    **load_kwargs,
) -> DatasetDict:
    """Load a `datasets` dataset and rename its columns to `image`, `label`, `center`, `case_id`.

    `path` is a folder written by `save_to_disk`, or anything `datasets.load_dataset` accepts (a local data
    folder or a Hub id; `load_kwargs` go there). `case_column` names the patient/case column; without one, every
    row is its own case. A dataset with a single split is split into train/test by case with `hash_split`.
    `centers` keeps only those centers. With `validate`, each row is decoded and checked (2D label, same size as
    the image, label ids within range) and the first problem raises `DataValidationError` naming the row.
    """
    source = str(path)
    local = Path(path)
    if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
        loaded = load_from_disk(source)
    else:
        loaded = load_dataset(source, **load_kwargs)
    if isinstance(loaded, Dataset):
        loaded = DatasetDict({"train": loaded})

    renames = {image_column: "image", label_column: "label", center_column: "center"}
    if case_column is not None:
        renames[case_column] = "case_id"
    result = {}
    for split, dataset in loaded.items():
        missing = [column for column in renames if column not in dataset.column_names]
        if missing:
            raise DataValidationError(
                f"{source}[{split}]: missing column(s) {missing}; available columns: {dataset.column_names}."
            )
        dataset = dataset.rename_columns({old: new for old, new in renames.items() if old != new})
        dataset = dataset.cast_column("center", Value("string"))
        if case_column is None:
            dataset = dataset.add_column("case_id", [f"{split}-{index}" for index in range(len(dataset))])
        else:
            dataset = dataset.cast_column("case_id", Value("string"))
        result[split] = dataset

    if len(result) == 1:
        (only,) = result.values()
        splits = hash_split(only["center"], only["case_id"], test_fraction)
        result = {
            name: only.select([i for i, split in enumerate(splits) if split == name]) for name in ("train", "test")
        }
    dataset_dict = DatasetDict(result)
    if centers is not None:
        dataset_dict = select_centers(dataset_dict, centers)
    if validate:
        for split, dataset in dataset_dict.items():
            _validate_rows(dataset, split, source, num_labels, ignore_index)
    return dataset_dict
