"""Load NIfTI volumes `<root>/<center>/images/<case>.nii.gz` + `<root>/<center>/labels/<case>.nii.gz` as 2D slices.

Needs nibabel (`pip install "peft_medseg[nifti]"`). Slices are cut from the voxel array as stored (no
reorientation); `slice_index`, `spacing` and `case_id` let `stack_slices` put predictions back into volumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, Features, Image, Value
from datasets import Sequence as SequenceFeature
from PIL import Image as PILImage

from .splits import hash_split
from .validation import DataValidationError, check_label_values, check_safe_name
from .volumes import AFFINE_TOLERANCE_MM, nifti_stem

NIFTI_FEATURES = Features(
    {
        "image": Image(),
        "label": Image(),
        "center": Value("string"),
        "case_id": Value("string"),
        "slice_index": Value("int32"),
        "spacing": SequenceFeature(Value("float32")),
    }
)


def _nibabel():
    try:
        import nibabel
    except ImportError as error:
        raise ImportError('Loading NIfTI volumes needs nibabel: pip install "peft_medseg[nifti]".') from error
    return nibabel


def _load_volume(path: Path):
    nibabel = _nibabel()
    try:
        volume = nibabel.load(str(path))
        array = np.asanyarray(volume.dataobj)
        return array, tuple(float(z) for z in volume.header.get_zooms()[:3]), np.asarray(volume.affine)
    except Exception as error:  # noqa: BLE001 - nibabel raises many types; all mean "cannot read this file"
        raise DataValidationError(f"{path}: unreadable NIfTI file ({error}).") from error


def _label_image(labels: np.ndarray) -> PILImage.Image:
    if labels.min() >= 0 and labels.max() <= 255:
        return PILImage.fromarray(labels.astype(np.uint8), mode="L")
    return PILImage.fromarray(labels.astype(np.int32), mode="I")


def load_nifti_dataset(
    root: str | Path,
    axis: int = 2,
    centers: Sequence[str] | None = None,
    num_labels: int | None = None,
    ignore_index: int | None = None,
    test_fraction: float = 0.2,
    skip_empty_slices: bool = False,
) -> DatasetDict:
    """Slice 3D NIfTI volumes along `axis` into a train/test `DatasetDict` of 2D samples.

    Columns: `image` (float32 PIL image, mode F, intensities as stored), `label` (class ids), `center`,
    `case_id` (the file name without `.nii.gz`), `slice_index`, `spacing` (the volume's 3 voxel sizes in mm).
    Cases are split into train/test by `hash_split`, so all slices of a volume land in the same split.
    `skip_empty_slices` drops slices without foreground (then `stack_slices` rebuilds only the kept slices).
    Raises `DataValidationError` naming the file for a missing label volume, a shape mismatch, a non-3D volume,
    non-integer labels, or label ids outside `0..num_labels-1` (besides `ignore_index`).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(f"{root}: dataset folder not found.")
    available = sorted(
        check_safe_name(p.name, f"{p}: center folder name") for p in root.iterdir() if (p / "images").is_dir()
    )
    if centers is not None:
        missing = [center for center in centers if center not in available]
        if missing:
            raise DataValidationError(
                f"{root}: requested center(s) {missing} have no samples; available centers: {available}."
            )
        available = [center for center in available if center in set(centers)]

    rows: list[tuple] = []
    for center in available:
        image_paths = sorted(p for p in (root / center / "images").iterdir() if nifti_stem(p))
        if not image_paths:
            raise DataValidationError(f"{root / center / 'images'}: no .nii.gz or .nii volumes.")
        for image_path in image_paths:
            case = nifti_stem(image_path)
            label_path = next(
                (p for p in (root / center / "labels" / f"{case}{s}" for s in (".nii.gz", ".nii")) if p.is_file()),
                None,
            )
            if label_path is None:
                raise DataValidationError(
                    f"{root / center / 'labels' / case}.nii.gz: missing label volume for {image_path}."
                )
            image, spacing, image_affine = _load_volume(image_path)
            labels, label_spacing, label_affine = _load_volume(label_path)
            if image.ndim != 3:
                raise DataValidationError(f"{image_path}: volume has shape {image.shape}, expected 3D.")
            if image.shape != labels.shape:
                raise DataValidationError(
                    f"{label_path}: label volume shape {labels.shape} differs from image shape {image.shape} ({image_path})."
                )
            if not np.allclose(image_affine, label_affine, atol=AFFINE_TOLERANCE_MM):
                raise DataValidationError(
                    f"{label_path}: affine differs from its image's ({image_path}) by up to "
                    f"{np.abs(image_affine - label_affine).max():.4g} mm (spacing {label_spacing} vs {spacing}): the "
                    "label does not lie on the image's voxels. Resample it onto the image first."
                )
            if not np.array_equal(labels, np.round(labels)):
                raise DataValidationError(f"{label_path}: label volume holds non-integer values, expected class ids.")
            labels = labels.astype(np.int64)
            check_label_values(labels, num_labels, ignore_index, str(label_path))
            for index in range(image.shape[axis]):
                label_slice = np.take(labels, index, axis=axis)
                if skip_empty_slices and not (label_slice > 0).any():
                    continue
                image_slice = np.take(image, index, axis=axis).astype(np.float32)
                rows.append((center, case, index, list(spacing), image_slice, label_slice))
    if not rows:
        raise DataValidationError(f"{root}: no slices found.")

    splits = hash_split([r[0] for r in rows], [r[1] for r in rows], test_fraction)
    columns: dict[str, dict[str, list]] = {}
    for (center, case, index, spacing, image_slice, label_slice), split in zip(rows, splits):
        column = columns.setdefault(split, {name: [] for name in NIFTI_FEATURES})
        column["image"].append(PILImage.fromarray(image_slice, mode="F"))
        column["label"].append(_label_image(label_slice))
        column["center"].append(center)
        column["case_id"].append(case)
        column["slice_index"].append(index)
        column["spacing"].append(spacing)
    return DatasetDict(
        {
            split: Dataset.from_dict(columns[split], features=NIFTI_FEATURES)
            for split in ("train", "test")
            if split in columns
        }
    )
