"""The one entry point to multi-center data: a name or path in, a checked train/test `DatasetDict` out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict

from .folder import load_folder_dataset
from .hf_dataset import load_hf_segmentation_dataset
from .splits import center_names
from .validation import DataValidationError, check_safe_name

SYNTHETIC = "synthetic"
SYNTHETIC_3D = "synthetic3d"
IGNORE_INDEX = 255  # the label of pixels that neither train nor score (see `segmentation_loss`)


def load_multicenter_dataset(
    dataset: str,
    centers: Sequence[str] | None = None,
    num_labels: int | None = None,
    label_map: Mapping[int, int] | None = None,
    volumes: bool = False,
) -> tuple[DatasetDict, dict[int, str]]:
    """A train/test `DatasetDict` (columns image, label, center, case_id) and its id2label.

    `volumes=True` (3D models) loads whole volumes instead: `"synthetic3d"` (the embedded two-channel head volumes,
    generated and cached on first use; `"synthetic"` means it too) or a NIfTI folder `<root>/<center>/images|labels`
    (see `peft_medseg.data.volumes`); rows hold file paths, labels are checked case by case.

    `dataset` is `"synthetic"` (the embedded simulated brain MRI, generated and cached on first use), a local folder
    (`<root>/<center>/images|masks`) or anything `datasets` loads (a `save_to_disk` folder or a Hub id).

    Label ids are checked before anything trains: `label_map` first rewrites mask values (`{255: 1}` for 0/255
    masks); then the training masks must hold exactly the ids `0..K-1`, each at least once, with `K = num_labels`
    when given (a base's `num_labels`: data with fewer classes would be scored on classes it never has). Center
    names must be usable in file names (see `check_safe_name`). Errors name the dataset and the values found.
    """
    if volumes:
        return _load_volumes(dataset, centers, num_labels, label_map)
    if dataset == SYNTHETIC:
        from .synthetic import ID2LABEL, load_synthetic_mri

        data, id2label = load_synthetic_mri(centers=list(centers) if centers else None), dict(ID2LABEL)
    else:
        path = Path(dataset)
        # With a label map the raw values are not ids yet: the ranges are checked after mapping.
        loader_labels = None if label_map else num_labels
        if path.is_dir() and any((child / "images").is_dir() for child in path.iterdir()):
            data = load_folder_dataset(path, centers=centers, num_labels=loader_labels)
        else:
            data = load_hf_segmentation_dataset(dataset, centers=centers, num_labels=loader_labels)
        id2label = None
    for center in center_names(data):
        check_safe_name(center, f"{dataset}: center name")
    if label_map:
        data = data.map(partial(_map_labels, label_map=dict(label_map)), input_columns="label", desc="label map")
    values = _label_values(data["train"])
    found = values[values != IGNORE_INDEX]  # 255 marks pixels to ignore (loss and scores skip them)
    expected = num_labels or (len(id2label) if id2label else int(found.max(initial=0)) + 1)
    if expected < 2 or found.tolist() != list(range(expected)):
        if not label_map and IGNORE_INDEX in values and found.tolist() == [0]:
            hint = f"for 0/{IGNORE_INDEX} masks map the foreground to class 1 (--label_map {IGNORE_INDEX}=1)"
        elif not label_map and found.max(initial=0) > len(found):
            hint = f"map the mask values to class ids (--label_map VALUE=ID, e.g. {int(found.max())}=1)"
        else:
            hint = "check that this data and the model share a label set"
        raise DataValidationError(
            f"{dataset}: the training masks hold label values {values.tolist()[:10]}, expected each of "
            f"0..{max(expected, 2) - 1}{' (the model has ' + str(num_labels) + ' classes)' if num_labels else ''}; "
            f"{hint}."
        )
    return data, id2label or {i: str(i) for i in range(expected)}


def _load_volumes(
    dataset: str, centers: Sequence[str] | None, num_labels: int | None, label_map: Mapping[int, int] | None
) -> tuple[DatasetDict, dict[int, str]]:
    from .volumes import load_volume_dataset

    if label_map:
        raise DataValidationError(f"{dataset}: --label_map applies to 2D masks; write volume labels as class ids.")
    if dataset in (SYNTHETIC, SYNTHETIC_3D):
        from .synthetic3d import ID2LABEL_3D, synthetic_volumes_dir

        root, id2label = synthetic_volumes_dir(), dict(ID2LABEL_3D)
    else:
        root, id2label = Path(dataset), None
    data, found = load_volume_dataset(root, centers=centers, num_labels=num_labels)
    expected = num_labels or (len(id2label) if id2label else found[-1] + 1)
    # Small lesion classes may be missing from some cases, but every class must occur in some training label.
    if expected < 2 or found != list(range(expected)):
        raise DataValidationError(
            f"{dataset}: the training labels hold ids {found[:10]}, expected each of 0..{max(expected, 2) - 1}"
            f"{' (the model has ' + str(num_labels) + ' classes)' if num_labels else ''}."
        )
    return data, id2label or {i: str(i) for i in range(expected)}


def parse_label_map(entries: Sequence[str] | None) -> dict[int, int] | None:
    """`["255=1", "128=2"]` (the `--label_map` argument) as `{255: 1, 128: 2}`."""
    if not entries:
        return None
    mapping = {}
    for entry in entries:
        source, sep, target = entry.partition("=")
        if not sep or not source.strip().isdigit() or not target.strip().isdigit():
            raise ValueError(f"--label_map entry {entry!r}: expected VALUE=ID with two non-negative integers.")
        mapping[int(source)] = int(target)
    return mapping


def _map_labels(label, label_map: dict[int, int]) -> dict:
    array = np.asarray(label).copy()
    original = array.copy()
    for source, target in label_map.items():
        array[original == source] = target
    return {"label": array.astype(np.uint8 if array.max() < 256 else np.int32)}


def _label_values(dataset: Dataset) -> np.ndarray:
    """The sorted label values used by a split's masks."""
    values: set[int] = set()
    for label in dataset.with_format(None)["label"]:
        values.update(np.unique(np.asarray(label)).tolist())
    return np.array(sorted(values), dtype=np.int64)


__all__ = ["IGNORE_INDEX", "SYNTHETIC", "load_multicenter_dataset", "parse_label_map"]
