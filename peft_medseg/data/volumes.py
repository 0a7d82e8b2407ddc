"""Multi-center 3D volumes for 3D models: NIfTI cases in a `datasets.Dataset`, MONAI dictionary transforms.

A dataset folder is `<root>/<center>/images/<case>.nii.gz` with `<root>/<center>/labels/<case>.nii.gz`; a
multi-channel image is one 4D file (channels last) or one file per channel named like nnU-Net
(`<case>_0000.nii.gz`, `<case>_0001.nii.gz`, ...; the label is `<case>.nii.gz`). Rows hold file paths, not voxels:
`image` (the channel files in order), `label`, `center`, `case_id`. Cases split into train/test by `hash_split`.

`VolumeTransform` turns rows into model inputs with MONAI's dictionary transforms: `LoadImaged` (channel files
stacked), `Orientationd` (RAS), `Spacingd` (to the base's voxel size, when it has one), per-channel z-score
(`NormalizeIntensityd`); for training, a random crop of the base's patch size centred on foreground or background
(`RandCropByPosNegLabeld`) with flips and intensity jitter; for evaluation, the whole volume (scored with
sliding-window inference). What a base expects (`VolumePreprocessing`: patch size, voxel size, channels) is saved with
it as `volume_preprocessing.json`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Sequence as SequenceFeature
from monai.transforms import (
    Compose,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensity,
    NormalizeIntensityd,
    Orientation,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacing,
    Spacingd,
    SpatialPadd,
)

from ..models3d import VolumePreprocessing
from .splits import hash_split
from .validation import DataValidationError, check_label_values, check_safe_name

NIFTI_SUFFIXES = (".nii.gz", ".nii")
CHANNEL_PATTERN = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
VOLUME_FEATURES = Features(
    {
        "image": SequenceFeature(Value("string")),
        "label": Value("string"),
        "center": Value("string"),
        "case_id": Value("string"),
    }
)
# Largest difference (mm) between an image's and its label's affine that still counts as the same geometry.
AFFINE_TOLERANCE_MM = 1e-3
# What "RAS" means for `Orientation(d)`: nibabel's axis labels, as MONAI has always used them. Given explicitly, they
# keep that meaning whatever a scan's "space" metadata says (and silence MONAI's notice that its default will change).
RAS_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def nifti_stem(path: Path) -> str | None:
    """The file name without `.nii.gz` / `.nii`, or None for a file that is not NIfTI."""
    for suffix in NIFTI_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def group_channel_files(paths: Sequence[Path]) -> list[tuple[str, list[Path]]]:
    """NIfTI files grouped into cases `(case name, files)`: the channel files in order for nnU-Net channel files
    (`<case>_0000`, `<case>_0001`, ... of one folder), else the one file. Files that are not NIfTI are left out.

    A channel set with a gap raises a `DataValidationError` naming it.
    """
    channels: dict[tuple[Path, str], dict[int, Path]] = {}
    cases: list[tuple[str, list[Path]]] = []
    for path in dict.fromkeys(paths):
        stem = nifti_stem(path)
        match = CHANNEL_PATTERN.match(stem) if stem else None
        if match:
            channels.setdefault((path.parent, match["case"]), {})[int(match["channel"])] = path
        elif stem:
            cases.append((stem, [path]))
    for (parent, case), by_index in channels.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise DataValidationError(
                f"{parent / case}_XXXX: channel files {sorted(by_index)}; expected 0000, 0001, ... without a gap."
            )
        cases.append((case, [by_index[i] for i in range(len(by_index))]))
    return cases


def _read_header(path: Path):
    import nibabel

    try:
        return nibabel.load(str(path))
    except Exception as error:  # noqa: BLE001 - nibabel raises many types; all mean "cannot read this file"
        raise DataValidationError(f"{path}: unreadable NIfTI file ({error}).") from error


def find_volume_cases(
    root: str | Path, centers: Sequence[str] | None = None, num_labels: int | None = None
) -> list[dict]:
    """Every case under `root` as a row `{image: [channel files], label, center, case_id, label_values}`, checked.

    Checked before anything trains, each error naming the file: a missing label, images and labels of other shapes
    or affines, a case with another channel count than the rest, labels that are not integer class ids in
    `0..num_labels-1`, center and case names unfit for file names.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(f"{root}: dataset folder not found.")
    available = sorted(
        check_safe_name(p.name, f"{p}: center folder name") for p in root.iterdir() if (p / "images").is_dir()
    )
    if not available:
        raise DataValidationError(f"{root}: no <center>/images folders.")
    if centers is not None:
        missing = sorted(set(centers) - set(available))
        if missing:
            raise DataValidationError(f"{root}: no center(s) {missing}; available centers: {available}.")
        available = [c for c in available if c in set(centers)]
    rows, channel_counts = [], {}
    for center in available:
        cases = dict(group_channel_files(sorted((root / center / "images").iterdir())))
        if not cases:
            raise DataValidationError(f"{root / center / 'images'}: no .nii.gz or .nii volumes.")
        for case, image_paths in sorted(cases.items()):
            check_safe_name(case, f"{image_paths[0]}: case name")
            label_path = next(
                (p for p in (root / center / "labels" / f"{case}{s}" for s in NIFTI_SUFFIXES) if p.is_file()), None
            )
            if label_path is None:
                raise DataValidationError(f"{root / center / 'labels' / case}.nii.gz: missing label for {case}.")
            label = _read_header(label_path)
            if len(label.shape) != 3:
                raise DataValidationError(f"{label_path}: label of shape {label.shape}, expected a 3D volume.")
            num_channels = 0
            for path in image_paths:
                image = _read_header(path)
                shape = image.shape
                if shape[:3] != label.shape or len(shape) not in (3, 4) or (len(shape) == 4 and len(image_paths) > 1):
                    raise DataValidationError(
                        f"{path}: image of shape {shape} for a label of shape {label.shape}; expected the label's "
                        "shape, with channels last in one 4D file or one 3D file per channel."
                    )
                if not np.allclose(image.affine, label.affine, atol=AFFINE_TOLERANCE_MM):
                    raise DataValidationError(
                        f"{label_path}: affine differs from its image's ({path}) by up to "
                        f"{np.abs(image.affine - label.affine).max():.4g} mm: the label does not lie on the image's "
                        "voxels. Resample it onto the image first."
                    )
                num_channels += shape[3] if len(shape) == 4 else 1
            channel_counts[str(image_paths[0])] = num_channels
            values = np.asarray(label.dataobj)
            if not np.array_equal(values, np.round(values)):
                raise DataValidationError(f"{label_path}: label volume holds non-integer values, expected class ids.")
            check_label_values(values.astype(np.int64), num_labels, None, str(label_path))
            rows.append(
                {
                    "image": [str(p) for p in image_paths],
                    "label": str(label_path),
                    "center": center,
                    "case_id": case,
                    "label_values": sorted(int(v) for v in np.unique(values)),
                }
            )
    counts = sorted(set(channel_counts.values()))
    if len(counts) > 1:
        example = {n: next(f for f, c in channel_counts.items() if c == n) for n in counts}
        raise DataValidationError(f"{root}: cases with different channel counts {example}; expected one count.")
    return rows


def load_volume_dataset(
    root: str | Path,
    centers: Sequence[str] | None = None,
    num_labels: int | None = None,
    test_fraction: float = 0.25,
) -> tuple[DatasetDict, list[int]]:
    """A train/test `DatasetDict` of checked volume cases (see `find_volume_cases`), split by case hash, and the
    label ids found in the training labels."""
    rows = find_volume_cases(root, centers, num_labels)
    splits = hash_split([r["center"] for r in rows], [r["case_id"] for r in rows], test_fraction)
    columns = list(VOLUME_FEATURES)
    data = DatasetDict(
        {
            split: Dataset.from_list(
                [{k: r[k] for k in columns} for r, s in zip(rows, splits) if s == split], features=VOLUME_FEATURES
            )
            for split in ("train", "test")
            if split in splits
        }
    )
    found = sorted({v for r, s in zip(rows, splits) if s == "train" for v in r["label_values"]})
    return data, found


def volume_channel_count(dataset: Dataset) -> int:
    """Input channels of the first case of a volume dataset (every case has the same count: checked on loading)."""
    first = dataset.with_format(None)[0]["image"]
    if len(first) > 1:
        return len(first)
    shape = _read_header(Path(first[0])).shape
    return shape[3] if len(shape) == 4 else 1


class VolumeTransform:
    """`set_transform` for volume rows: MONAI's loading, reorientation, resampling and normalisation, then (training)
    a positive/negative random crop of `roi_size` with flips and intensity jitter, seeded per sample and epoch.

    Returns `pixel_values` (C, D, H, W) float32 and `labels` (D, H, W) int64, with `center`, `case_id` and `spacing`
    (voxel size in mm after resampling, for HD95 in millimetres).
    """

    def __init__(self, preprocessing: VolumePreprocessing, train: bool, seed: int = 0) -> None:
        self.preprocessing, self.train, self.seed, self.epoch = preprocessing, train, seed, 0
        keys = ["image", "label"]
        steps = [
            LoadImaged(keys, image_only=True, ensure_channel_first=True),
            Orientationd(keys, axcodes="RAS", labels=RAS_AXIS_LABELS),
        ]
        if preprocessing.spacing is not None:
            steps.append(Spacingd(keys, pixdim=preprocessing.spacing, mode=("bilinear", "nearest")))
        steps.append(NormalizeIntensityd("image", channel_wise=True))
        if train:
            roi = preprocessing.roi_size
            positive = preprocessing.positive_fraction
            steps += [
                SpatialPadd(keys, spatial_size=roi),
                RandCropByPosNegLabeld(
                    keys, "label", spatial_size=roi, pos=positive, neg=1.0 - positive, num_samples=1
                ),
                RandFlipd(keys, prob=0.5, spatial_axis=0),
                RandFlipd(keys, prob=0.5, spatial_axis=1),
                RandFlipd(keys, prob=0.5, spatial_axis=2),
                RandScaleIntensityd("image", factors=0.1, prob=0.5),
                RandShiftIntensityd("image", offsets=0.1, prob=0.5),
            ]
        steps.append(EnsureTyped(keys, track_meta=True))
        self.compose = Compose(steps)

    def set_epoch(self, epoch: int) -> None:
        """Training crops and augmentation depend on (seed, epoch, case): exact on resume and across processes."""
        self.epoch = epoch

    def transform_case(self, image: list[str], label: str, key: str) -> dict:
        if self.train:
            digest = hashlib.sha1(f"{self.seed}/{self.epoch}/{key}".encode()).digest()
            self.compose.set_random_state(seed=int.from_bytes(digest[:4], "little"))
        data = self.compose({"image": list(image) if len(image) > 1 else image[0], "label": label})
        if isinstance(data, list):  # the crop returns a list of num_samples=1 samples
            data = data[0]
        image_tensor, label_tensor = data["image"], data["label"]
        spacing = [float(v) for v in image_tensor.pixdim[:3]]
        if image_tensor.shape[0] != self.preprocessing.num_channels:
            raise DataValidationError(
                f"{image[0]}: {image_tensor.shape[0]} channels, the base takes {self.preprocessing.num_channels}."
            )
        return {
            "pixel_values": image_tensor.as_tensor().float(),
            "labels": label_tensor.as_tensor()[0].round().long(),
            "spacing": spacing,
        }

    def __call__(self, batch: dict) -> dict:
        outputs: dict[str, list] = {"pixel_values": [], "labels": [], "spacing": []}
        for image, label, center, case in zip(batch["image"], batch["label"], batch["center"], batch["case_id"]):
            example = self.transform_case(image, label, f"{center}/{case}")
            for name, value in example.items():
                outputs[name].append(value)
        outputs["center"] = list(batch["center"])
        outputs["case_id"] = list(batch["case_id"])
        return outputs


def volume_input_transform(preprocessing: VolumePreprocessing) -> Compose:
    """The deterministic part of `VolumeTransform` for one channel-first image with its affine (a `MetaTensor`):
    RAS orientation, resampling to the base's voxel size, per-channel z-score. Invertible: `inverse` maps a
    prediction made on its output back onto the input's voxels (MONAI records every step on the tensor)."""
    steps = [Orientation(axcodes="RAS", labels=RAS_AXIS_LABELS)]
    if preprocessing.spacing is not None:
        steps.append(Spacing(pixdim=preprocessing.spacing, mode="bilinear"))
    steps.append(NormalizeIntensity(channel_wise=True))
    return Compose(steps)


def is_volume_batch(pixel_values: torch.Tensor) -> bool:
    """Whether model inputs are volumes (B, C, D, H, W) rather than images (B, C, H, W)."""
    return pixel_values.ndim == 5
