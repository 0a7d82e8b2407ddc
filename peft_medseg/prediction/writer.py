"""A prediction run into one output folder: masks, overlays and `predictions.csv`, all or nothing."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..plots import plot_mask_overlay
from ..storage import OutputDirError, atomic_directory, claim_output_dir
from .predictor import Prediction, Predictor
from .scans import ScanInput, find_scans, read_scan, write_mask

PREDICTIONS_CSV = "predictions.csv"


def overlay_slice(prediction: Prediction) -> tuple[np.ndarray, np.ndarray, str]:
    """(image, mask, where) to draw: the image itself, or a volume's slice with the most foreground."""
    scan, mask = prediction.scan, prediction.mask
    if not scan.is_volume:
        return scan.array, mask, ""
    z = int(np.argmax((mask > 0).reshape(-1, mask.shape[-1]).sum(axis=0))) if mask.any() else mask.shape[-1] // 2
    return scan.array[0][..., z], mask[..., z], f", slice {z}"


def csv_row(prediction: Prediction, mask_path: Path, id2label: dict[int, str], num_labels: int) -> dict:
    """One `predictions.csv` row: the input, its route and distance, and the size of each class (`<class>_count`
    pixels or voxels; `<class>_mm3` for volumes)."""
    scan = prediction.scan
    row = {
        "input": scan.input.source,
        "kind": scan.input.kind,
        "route": prediction.route,
        "nearest_center": prediction.nearest or "",
        "distance": "" if prediction.distance is None else f"{prediction.distance:.4f}",
        "calibrated_distance": ""
        if prediction.calibrated_distance is None
        else f"{prediction.calibrated_distance:.4f}",
        "mask": mask_path.as_posix(),
    }
    counts = np.bincount(prediction.mask.ravel(), minlength=num_labels)
    voxel_mm3 = float(np.prod(scan.spacing)) if scan.is_volume and scan.spacing else None
    for label in range(1, num_labels):
        name = id2label.get(label, f"class_{label}")
        row[f"{name}_count"] = int(counts[label])
        row[f"{name}_mm3"] = "" if voxel_mm3 is None else f"{counts[label] * voxel_mm3:.2f}"
    return row


def predict_to_folder(
    predictor: Predictor,
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    overwrite: bool = False,
    overlays: bool = True,
    progress: bool = True,
) -> Path:
    """Segment every scan of `inputs` into `output_dir`: `masks/<name>.png|.nii.gz` in each input's geometry,
    `overlays/<name>.png` (with a legend) and `predictions.csv` (one row per input: route, distance, class sizes).

    Every input is found and named before anything runs, and an existing `output_dir` is refused unless
    `overwrite`. The folder is written under a temporary name and swapped in complete: a failed run leaves the old
    folder (or none) exactly as it was.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise OutputDirError(f"{output_dir}: already exists; choose another output folder or pass --overwrite.")
    scans: list[ScanInput] = find_scans(inputs)
    rows = []
    with claim_output_dir(output_dir), atomic_directory(output_dir) as staging:
        (staging / "masks").mkdir()
        if overlays:
            (staging / "overlays").mkdir()
        bar = tqdm(total=len(scans), desc="predict", unit="scan", disable=not progress)
        for group in predictor.iter_batches(scans):
            for prediction in predictor.predict([read_scan(s) for s in group]):
                path = write_mask(prediction.scan, prediction.mask, staging / "masks")
                rows.append(csv_row(prediction, path.relative_to(staging), predictor.id2label, predictor.num_labels))
                if overlays:
                    image, mask, where = overlay_slice(prediction)
                    title = f"{prediction.scan.input.name}{where} — {prediction.route}"
                    plot_mask_overlay(
                        image, mask, predictor.id2label, staging / "overlays" / f"{path.name.split('.')[0]}.png", title
                    )
                bar.update()
        bar.close()
        with open(staging / PREDICTIONS_CSV, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return output_dir
