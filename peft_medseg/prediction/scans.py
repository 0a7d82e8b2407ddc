"""Scans in and masks out, in the scans' own geometry: finding inputs, reading them, writing label masks.

Inputs are 2D images (PNG, JPEG, TIFF; read with Pillow as stored), NIfTI volumes (`.nii`, `.nii.gz`; one file,
3D or 4D with channels last, or one file per channel named like nnU-Net: `case_0000.nii.gz`, `case_0001.nii.gz`)
and DICOM series folders (read with MONAI's `PydicomReader`; one series per folder). Masks are written as 8-bit PNG
at the image's original size, or as NIfTI with the input's affine and header (a DICOM series gets the affine MONAI
computes from it). Output names come from input file names, checked like every name that becomes a path.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.transforms import image_to_array
from ..data.validation import DataValidationError
from ..data.volumes import NIFTI_SUFFIXES, group_channel_files
from ..storage import check_safe_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
# PNG masks are 8-bit: label ids 0..255.
MAX_PNG_LABELS = 256


@dataclass
class ScanInput:
    """One scan to segment: its output name, kind ("image", "nifti" or "dicom") and files (channels in order, or
    the DICOM series folder)."""

    name: str
    kind: str
    paths: list[Path]

    @property
    def source(self) -> str:
        """The input as the user named it (the first channel's file, or the folder)."""
        return str(self.paths[0])


@dataclass
class Scan:
    """A read scan. `array` is (H, W[, C]) for an image, or (C, X, Y, Z) for a volume, as stored."""

    input: ScanInput
    array: np.ndarray
    affine: np.ndarray | None = None
    header: object | None = None
    spacing: tuple[float, ...] = field(default_factory=tuple)

    @property
    def is_volume(self) -> bool:
        return self.input.kind != "image"


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in NIFTI_SUFFIXES + IMAGE_SUFFIXES + DICOM_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def _stem(path: Path) -> str:
    suffix = _suffix(path) or path.suffix
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def _is_dicom_file(path: Path) -> bool:
    if _suffix(path) in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _is_dicom_folder(folder: Path) -> bool:
    files = [p for p in folder.iterdir() if p.is_file()]
    return bool(files) and all(_is_dicom_file(p) for p in files if not p.name.startswith("."))


def find_scans(specs: Sequence[str | Path], unique_names: bool = True) -> list[ScanInput]:
    """The scans named by files, folders (every scan inside, recursively; a folder of DICOM files is one series) and
    glob patterns, in a stable order. nnU-Net channel files of one case become one scan.

    Raises a `DataValidationError` naming the path for a missing input, an unsupported file type, channel files that
    do not run 0000, 0001, ... without a gap, and (with `unique_names`, for writing) two inputs that would write the
    same output name.
    """
    files: list[Path] = []
    dicom_folders: list[Path] = []
    for spec in specs:
        text = str(spec)
        matches = sorted(Path(p) for p in glob.glob(text, recursive=True)) if glob.has_magic(text) else [Path(text)]
        if not matches or not matches[0].exists():
            raise DataValidationError(f"{text}: no such file or folder (or nothing matches the pattern).")
        for path in matches:
            if path.is_dir():
                folders = [path, *sorted(p for p in path.rglob("*") if p.is_dir())]
                for folder in folders:
                    if _is_dicom_folder(folder):
                        dicom_folders.append(folder)
                    else:
                        files += sorted(
                            p
                            for p in folder.iterdir()
                            if p.is_file() and _suffix(p) in IMAGE_SUFFIXES + NIFTI_SUFFIXES
                        )
            elif _suffix(path) in IMAGE_SUFFIXES + NIFTI_SUFFIXES:
                files.append(path)
            elif _is_dicom_file(path):
                dicom_folders.append(path.parent)
            else:
                raise DataValidationError(
                    f"{path}: unsupported input; expected {', '.join(IMAGE_SUFFIXES + NIFTI_SUFFIXES)} files, or a "
                    "folder holding one DICOM series."
                )
    scans: list[ScanInput] = [
        ScanInput(_stem(path), "image", [path]) for path in dict.fromkeys(files) if _suffix(path) in IMAGE_SUFFIXES
    ]
    scans += [ScanInput(case, "nifti", paths) for case, paths in group_channel_files(files)]
    for folder in dict.fromkeys(dicom_folders):
        scans.append(ScanInput(folder.name, "dicom", [folder]))
    seen: dict[str, ScanInput] = {}
    for scan in scans:
        check_safe_name(scan.name, f"{scan.source}: output name")
        if unique_names and scan.name in seen:
            raise DataValidationError(
                f"{scan.source} and {seen[scan.name].source}: both would be written as {scan.name!r}; rename one or "
                "predict them in two runs."
            )
        seen[scan.name] = scan
    if not scans:
        raise DataValidationError(f"{list(map(str, specs))}: no scans found.")
    return sorted(scans, key=lambda s: s.source)


def read_scan(scan: ScanInput) -> Scan:
    """Read one scan, as stored (no reorientation: masks go back onto the same voxels). Errors name the file."""
    try:
        if scan.kind == "image":
            return _read_image(scan)
        if scan.kind == "nifti":
            return _read_nifti(scan)
        return _read_dicom(scan)
    except DataValidationError:
        raise
    except Exception as error:  # noqa: BLE001 - readers raise many types; all mean "cannot read this input"
        raise DataValidationError(f"{scan.source}: unreadable {scan.kind} input ({error}).") from error


def _read_image(scan: ScanInput) -> Scan:
    with Image.open(scan.paths[0]) as image:
        array = image_to_array(image)  # the modes the model's transform reads, converted as it converts them
    if array.ndim not in (2, 3):
        raise DataValidationError(f"{scan.source}: image of shape {array.shape}; expected (H, W) or (H, W, C).")
    return Scan(scan, array)


def _read_nifti(scan: ScanInput) -> Scan:
    import nibabel

    volumes, first = [], None
    for path in scan.paths:
        image = nibabel.load(str(path))
        data = np.asanyarray(image.dataobj)
        if data.ndim == 3:
            data = data[None]
        elif data.ndim == 4:
            data = np.moveaxis(data, -1, 0)
        else:
            raise DataValidationError(f"{path}: volume of shape {data.shape}; expected 3D, or 4D with channels last.")
        if first is None:
            first = image
        elif data.shape[1:] != tuple(first.shape[:3]) or not np.allclose(image.affine, first.affine, atol=1e-3):
            raise DataValidationError(
                f"{path}: shape {data.shape[1:]} or affine differ from {scan.paths[0]}; the channels of a case must "
                "lie on the same voxels."
            )
        volumes.append(data)
    array = np.concatenate(volumes).astype(np.float32)
    spacing = tuple(float(z) for z in first.header.get_zooms()[:3])
    return Scan(scan, array, np.asarray(first.affine), first.header, spacing)


def _read_dicom(scan: ScanInput) -> Scan:
    import pydicom
    from monai.data import PydicomReader

    folder = scan.paths[0]
    series = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        series.setdefault(str(getattr(header, "SeriesInstanceUID", "")), []).append(path.name)
    if len(series) > 1:
        listing = "; ".join(f"{uid or '(no SeriesInstanceUID)'}: {len(names)} files" for uid, names in series.items())
        raise DataValidationError(
            f"{folder}: holds {len(series)} DICOM series ({listing}); expected one series per folder."
        )
    reader = PydicomReader(affine_lps_to_ras=True)
    array, meta = reader.get_data(reader.read(str(folder)))
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise DataValidationError(f"{folder}: DICOM series of shape {array.shape}; expected a 3D volume.")
    affine = np.asarray(meta["affine"], dtype=np.float64)
    spacing = tuple(float(np.linalg.norm(affine[:3, i])) for i in range(3))
    return Scan(scan, array[None], affine, None, spacing)


def check_mask_format(num_labels: int) -> None:
    """Refuse label sets an 8-bit mask cannot hold, before anything runs."""
    if num_labels > MAX_PNG_LABELS:
        raise ValueError(
            f"the model predicts {num_labels} classes, but PNG and uint8 NIfTI masks hold label ids 0..255 only."
        )


def write_mask(scan: Scan, mask: np.ndarray, folder: Path) -> Path:
    """Write `mask` (image: (H, W); volume: (X, Y, Z)) as `folder/<name>.png` or `.nii.gz` in the scan's geometry."""
    if scan.is_volume:
        import nibabel

        header = scan.header.copy() if scan.header is not None else None
        image = nibabel.Nifti1Image(mask.astype(np.uint8), scan.affine, header)
        image.set_data_dtype(np.uint8)
        if header is not None:
            image.header.set_zooms(scan.header.get_zooms()[:3])
        image.header.set_intent("label")
        path = folder / f"{scan.input.name}.nii.gz"
        nibabel.save(image, str(path))
        return path
    path = folder / f"{scan.input.name}.png"
    Image.fromarray(mask.astype(np.uint8), mode="L").save(path)
    return path
