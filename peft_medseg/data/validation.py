"""Checks on image/mask pairs, with errors that name the file, the value and what was expected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .. import storage


class DataValidationError(ValueError):
    """A sample that cannot be used: missing or unreadable file, size mismatch, label id out of range."""


def check_safe_name(name, what: str = "center name") -> str:
    """`storage.check_safe_name`, raising `DataValidationError`: names from data become parts of output paths."""
    try:
        return storage.check_safe_name(name, what)
    except ValueError as error:
        raise DataValidationError(str(error)) from None


def check_label_values(labels: np.ndarray, num_labels: int | None, ignore_index: int | None, source: str) -> None:
    """Raise if `labels` holds an id outside 0..num_labels-1, other than `ignore_index` when one is configured."""
    if num_labels is None:
        return
    values = np.unique(labels)
    allowed = (values >= 0) & (values < num_labels)
    if ignore_index is not None:
        allowed |= values == ignore_index
    bad = values[~allowed]
    if bad.size:
        hint = (
            "" if ignore_index is not None or 255 not in bad else " (set ignore_index=255 if 255 marks ignored pixels)"
        )
        raise DataValidationError(
            f"{source}: label {int(bad[0])} outside 0..{num_labels - 1} (num_labels={num_labels}){hint}; "
            f"found labels {values.tolist()}."
        )


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as a 2D integer array of label ids, with errors naming the file."""
    try:
        with Image.open(path) as mask:
            if mask.mode not in ("L", "P", "1", "I", "I;16"):
                raise DataValidationError(
                    f"{path}: mask mode {mask.mode!r} is not a single-channel label map (expected L, P, 1, I or I;16)."
                )
            return np.array(mask)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataValidationError(f"{path}: unreadable mask file ({error}).") from error


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file, checking that it decodes, with errors naming the file."""
    try:
        with Image.open(path) as image:
            size = image.size
            # Decode every pixel: verify() alone passes a truncated JPEG, which then fails mid-training.
            image.load()
        return size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataValidationError(f"{path}: unreadable image file ({error}).") from error


def validate_pair(
    image_path: str | Path, mask_path: str | Path, num_labels: int | None = None, ignore_index: int | None = None
) -> None:
    """Check one image/mask pair: both exist and decode, sizes match, and label ids are within range."""
    if not Path(image_path).is_file():
        raise DataValidationError(f"{image_path}: image file not found.")
    if not Path(mask_path).is_file():
        raise DataValidationError(f"{mask_path}: missing mask for image {image_path}.")
    size = image_size(image_path)
    mask = read_mask(mask_path)
    if (mask.shape[1], mask.shape[0]) != size:
        raise DataValidationError(
            f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image size {size[0]}x{size[1]} "
            f"({image_path})."
        )
    check_label_values(mask, num_labels, ignore_index, str(mask_path))
