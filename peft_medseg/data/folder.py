"""Load a multi-center folder dataset: `<root>/<center>/images/<id>.<ext>` with `<root>/<center>/masks/<id>.png`."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset, DatasetDict, Features, Image, Value

from .splits import hash_split
from .validation import DataValidationError, check_safe_name, validate_pair

# The splits a dataset may have; any other name in a manifest is a typo that no recipe would read.
SPLITS = ("train", "validation", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

SEGMENTATION_FEATURES = Features(
    {
        "image": Image(),
        "label": Image(),
        "center": Value("string"),
        "case_id": Value("string"),
        "id": Value("string"),
    }
)


def _center_dirs(root: Path) -> list[str]:
    return sorted(
        check_safe_name(p.name, f"{p}: center folder name") for p in root.iterdir() if (p / "images").is_dir()
    )


def _images_by_id(images_dir: Path) -> dict[str, Path]:
    images: dict[str, Path] = {}
    for path in sorted(images_dir.iterdir()):
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            if path.stem in images:
                # x.png next to x.jpg: which one the mask x.png belongs to is a guess; refuse to guess.
                raise DataValidationError(
                    f"{images[path.stem]} and {path}: two images for id {path.stem!r}; keep one image per id."
                )
            images[path.stem] = path
    return images


def _read_manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for column in ("center", "id", "split"):
        if rows and column not in rows[0]:
            raise DataValidationError(f"{path}: missing column {column!r}; found columns {list(rows[0])}.")
    seen: dict[tuple[str, str], int] = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        if row["split"] not in SPLITS:
            raise DataValidationError(
                f"{path}, line {line}: split {row['split']!r} for id {row['id']!r}; expected one of {list(SPLITS)}."
            )
        key = (row["center"], row["id"])
        if key in seen:
            raise DataValidationError(
                f"{path}, lines {seen[key]} and {line}: id {row['id']!r} of center {row['center']!r} is listed twice "
                "(a sample must be in exactly one split)."
            )
        seen[key] = line
        check_safe_name(row["center"], f"{path}, line {line}: center name")
    return rows


def _ordered_splits(names: set[str]) -> list[str]:
    return [n for n in SPLITS if n in names]


def load_folder_dataset(
    root: str | Path,
    centers: Sequence[str] | None = None,
    num_labels: int | None = None,
    ignore_index: int | None = None,
    test_fraction: float = 0.2,
    validate: bool = True,
) -> DatasetDict:
    """Load `<root>/<center>/images/<id>.{png,jpg,tif}` and `<root>/<center>/masks/<id>.png` as a `DatasetDict`.

    Columns: `image` and `label` (`datasets.Image`, PIL on access; the label is a map of class ids), `center`,
    `case_id` and `id` (the file stem).

    With a `<root>/manifest.csv` (columns `center,id,split`, optionally `group`), the manifest decides which
    samples exist and their split, and `group` (the patient or lesion) becomes `case_id`. Without one, every image
    is a sample, `case_id` is its id, and each center is split by `hash_split` (by case, `test_fraction` to test).

    `centers` keeps only those centers (a requested center without samples raises, listing the available ones).
    With `validate`, every pair is checked before loading (file exists and decodes, same size, label ids within
    `0..num_labels-1`, plus `ignore_index` when given) and the first problem raises `DataValidationError`
    naming the file.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(f"{root}: dataset folder not found.")
    manifest_path = root / "manifest.csv"
    if manifest_path.is_file():
        manifest = _read_manifest(manifest_path)
        available = sorted({row["center"] for row in manifest})
    else:
        manifest = None
        available = _center_dirs(root)
    if centers is not None:
        missing = [center for center in centers if center not in available]
        if missing:
            raise DataValidationError(
                f"{root}: requested center(s) {missing} have no samples; available centers: {available}."
            )
        available = [center for center in available if center in set(centers)]
    if not available:
        raise DataValidationError(f"{root}: no centers found (expected <root>/<center>/images/ folders).")

    rows = []
    images_by_center = {center: _images_by_id(root / center / "images") for center in available}
    if manifest is not None:
        for entry in manifest:
            center = entry["center"]
            if center not in images_by_center:
                continue
            image_path = images_by_center[center].get(entry["id"])
            if image_path is None:
                raise DataValidationError(
                    f"{root / center / 'images' / entry['id']}.*: image listed in {manifest_path} not found "
                    f"(looked for extensions {list(IMAGE_EXTENSIONS)})."
                )
            rows.append((center, entry["id"], entry.get("group") or entry["id"], entry["split"], image_path))
    else:
        for center, images in images_by_center.items():
            if not images:
                raise DataValidationError(f"{root / center / 'images'}: no images ({list(IMAGE_EXTENSIONS)}).")
            rows.extend((center, image_id, image_id, None, path) for image_id, path in images.items())
        splits = hash_split([r[0] for r in rows], [r[2] for r in rows], test_fraction)
        rows = [(c, i, g, split, p) for (c, i, g, _, p), split in zip(rows, splits)]

    columns: dict[str, dict[str, list]] = {}
    for center, image_id, case_id, split, image_path in rows:
        mask_path = root / center / "masks" / f"{image_id}.png"
        if validate:
            validate_pair(image_path, mask_path, num_labels, ignore_index)
        elif not mask_path.is_file():
            raise DataValidationError(f"{mask_path}: missing mask for image {image_path}.")
        column = columns.setdefault(split, {name: [] for name in SEGMENTATION_FEATURES})
        column["image"].append(str(image_path))
        column["label"].append(str(mask_path))
        column["center"].append(center)
        column["case_id"].append(case_id)
        column["id"].append(image_id)
    return DatasetDict(
        {
            split: Dataset.from_dict(columns[split], features=SEGMENTATION_FEATURES)
            for split in _ordered_splits(set(columns))
        }
    )
