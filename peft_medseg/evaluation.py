"""Evaluating segmentation models per center, and the center x center matrix of base, adapters and full models.

Two protocols (see `center_matrix`):
- *paper*: each model (the base, one adapter per new center, full fine-tuned models) is evaluated on every center's
  test split: one row per model, one column per test center;
- *routed*: each center goes through its own adapter and centers without one through the base, in mixed-center
  batches (`adapter_names`), which is how one deployed model serves every hospital.

Cells hold the mean foreground Dice (per image, then averaged per center) and HD95 in pixels of the model input.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader

from .data import collate_segmentation
from .metrics import dice_per_class, hd95
from .storage import EVALUATION_FILENAME, is_adapter_folder, load_base, read_adapter_config

BASE_ROW = "base"
ROUTED_ROW = "routed"
# Row name for the base in mixed-center batches (see peft_medseg.BASE_ADAPTER_NAME).
BASE_ADAPTER = "__base__"


@torch.no_grad()
def predict(model: nn.Module, pixel_values: torch.Tensor, adapter_names: Sequence[str] | None = None) -> torch.Tensor:
    """Predicted label maps (B, H, W) at the input size; `adapter_names` routes each row of a peft model."""
    kwargs = {"adapter_names": list(adapter_names)} if adapter_names is not None else {}
    logits = model(pixel_values=pixel_values, **kwargs).logits
    if logits.shape[-2:] != pixel_values.shape[-2:]:
        logits = torch.nn.functional.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear")
    return logits.argmax(dim=1)


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    dataset: Dataset,
    num_labels: int,
    batch_size: int = 16,
    adapter_for_center: Callable[[str], str] | None = None,
    compute_hd95: bool = True,
    ignore_index: int = 255,
) -> dict[str, dict[str, float | list[int]]]:
    """Per-center scores `{center: {"dice", "hd95", "absent_classes"}}` of `model` on a transformed dataset.

    `dataset` rows have `pixel_values`, `labels` and `center` (a `set_transform`ed split). Each image scores the mean
    Dice over the foreground classes of its center (a class absent from both prediction and reference of that image
    scores 1) and the mean HD95 over those where it is defined (NaN when none is); centers average their images.
    A class that appears in no reference and no prediction of a center is left out of that center's means, and
    listed in `absent_classes`: it would otherwise add a perfect 1 to every image and inflate the score.
    With `adapter_for_center`, each row is routed through the adapter named for its center in one mixed batch.
    The model is put in eval mode, and put back in its previous mode afterwards.

    Raises a `ValueError` when the model predicts another number of classes than `num_labels`, or a reference
    holds a label id outside `0..num_labels-1` (other than `ignore_index`), naming the center and the row.
    """
    model_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if model_labels is not None and model_labels != num_labels:
        raise ValueError(f"the model predicts {model_labels} classes, but the scores were asked for {num_labels}.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_segmentation)
    dice_scores, hd95_scores, centers = [], [], []
    present: dict[str, np.ndarray] = {}  # per center: which classes occur in some reference or prediction
    row = 0
    for batch in loader:
        names = [adapter_for_center(c) for c in batch["center"]] if adapter_for_center else None
        predictions = predict(model, batch["pixel_values"].to(device), names).cpu().numpy()
        references = batch["labels"].numpy()
        ids = batch.get("id") or batch.get("case_id") or [str(row + i) for i in range(len(references))]
        for prediction, reference, center, sample in zip(predictions, references, batch["center"], ids):
            values = np.unique(reference)
            bad = values[((values < 0) | (values >= num_labels)) & (values != ignore_index)]
            if bad.size:
                raise ValueError(
                    f"center {center!r}, sample {sample!r}: reference label {int(bad[0])} outside 0..{num_labels - 1}; "
                    "the data's label set does not match the model's num_labels."
                )
            seen = present.setdefault(center, np.zeros(num_labels, dtype=bool))
            seen[np.unique(prediction[(prediction >= 0) & (prediction < num_labels)])] = True
            seen[values[(values >= 0) & (values < num_labels)]] = True
            dice_scores.append(dice_per_class(prediction, reference, num_labels, ignore_index))
            if compute_hd95:
                hd95_scores.append(hd95(prediction, reference, num_labels, ignore_index=ignore_index))
            centers.append(center)
        row += len(references)
    model.train(was_training)
    scores = {}
    for center in sorted(present, key=str):
        rows = [i for i, c in enumerate(centers) if c == center]
        kept = [label for label in range(1, num_labels) if present[center][label]]
        absent = [label for label in range(1, num_labels) if not present[center][label]]
        dice = _mean_of_kept(dice_scores, rows, kept)
        hd = _mean_of_kept(hd95_scores, rows, kept) if compute_hd95 else math.nan
        scores[str(center)] = {"dice": dice, "hd95": hd, "absent_classes": absent}
    return scores


def _mean_of_kept(per_class: list[np.ndarray], rows: list[int], kept: list[int]) -> float:
    """Mean over `rows` of each row's NaN-aware mean over the `kept` classes (NaN when nothing is kept)."""
    if not kept:
        return math.nan
    table = np.array([per_class[i][kept] for i in rows])  # (images, kept classes)
    with warnings.catch_warnings():  # all-NaN rows (HD95 undefined everywhere) give NaN, as documented
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(np.nanmean(table, axis=1)))


def mean_dice(scores: dict[str, dict[str, float]]) -> float:
    """Mean over centers of the per-center Dice: the validation criterion of multi-center training."""
    return float(np.nanmean([value["dice"] for value in scores.values()]))


def json_scores(scores: dict[str, dict]) -> dict[str, dict]:
    """Scores for a JSON file: an undefined value (NaN, e.g. the HD95 of an empty prediction) becomes null."""

    def plain(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    return {center: {key: plain(value) for key, value in cell.items()} for center, cell in scores.items()}


def absent_classes_note(scores: dict[str, dict]) -> str:
    """A sentence naming the classes left out of the scores because no reference or prediction had them."""
    absent = {c: s.get("absent_classes") for c, s in scores.items() if s.get("absent_classes")}
    if not absent:
        return ""
    listed = "; ".join(f"{center}: {classes}" for center, classes in sorted(absent.items()))
    return f"Classes absent from every reference and prediction, left out of the means: {listed}."


@dataclass
class MatrixRow:
    """One row of the center matrix: a model (or the routed protocol) and its scores on every test center."""

    name: str
    method: str
    adapted: tuple[str, ...] = ()  # the center(s) it was adapted to: none for the base, every routed one for routed
    scores: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class CenterMatrix:
    """The center x center evaluation: rows (base first, routed last) and the test centers (columns)."""

    centers: list[str]
    rows: list[MatrixRow]
    # Routed protocol: center -> adapter name in the returned multi-adapter model; other centers use the base.
    routes: dict[str, str] = field(default_factory=dict)

    def row(self, name: str) -> MatrixRow:
        return next(row for row in self.rows if row.name == name)

    def forgetting(self, row: MatrixRow) -> float:
        """Mean Dice change vs the base on the centers `row` was not adapted to (negative: forgetting)."""
        base = self.row(BASE_ROW).scores
        old = [c for c in self.centers if c not in row.adapted]
        if not old:
            return math.nan
        return float(np.mean([row.scores[c]["dice"] - base[c]["dice"] for c in old]))

    def dice_array(self) -> np.ndarray:
        """(rows, centers) array of Dice."""
        return np.array([[row.scores[c]["dice"] for c in self.centers] for row in self.rows])

    def to_markdown(self) -> str:
        """A Markdown table: `dice / hd95` per cell, the adapted center in bold, and the forgetting column."""
        header = "| model | method | " + " | ".join(self.centers) + " | forgetting (old centers, ΔDice vs base) |"
        lines = [header, "|" + "---|" * (len(self.centers) + 3)]
        for row in self.rows:
            cells = []
            for center in self.centers:
                score = row.scores[center]
                text = f"{score['dice']:.3f} / {_format_hd95(score['hd95'])}"
                cells.append(f"**{text}**" if center in row.adapted else text)
            forgetting = "" if row.name == BASE_ROW else f"{self.forgetting(row):+.3f}"
            lines.append(f"| {row.name} | {row.method} | " + " | ".join(cells) + f" | {forgetting} |")
        notes = {absent_classes_note(row.scores) for row in self.rows} - {""}
        footer = "\n\nCells: mean foreground Dice / HD95 (pixels); bold: the model's own center.\n"
        return "\n".join(lines) + footer + "".join(f"\n{note}\n" for note in sorted(notes))

    def write_csv(self, path: str | Path) -> None:
        """One line per (row, test center): model, method, adapted_center, test_center, dice, hd95, forgetting."""
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["model", "method", "adapted_centers", "test_center", "dice", "hd95", "forgetting"])
            for row in self.rows:
                forgetting = "" if row.name == BASE_ROW else f"{self.forgetting(row):.6f}"
                for center in self.centers:
                    score = row.scores[center]
                    writer.writerow(
                        [row.name, row.method, " ".join(row.adapted), center, f"{score['dice']:.6f}",
                         f"{score['hd95']:.6f}", forgetting]
                    )  # fmt: skip

    def to_json(self) -> dict:
        """The matrix as a JSON-ready dict (undefined HD95 as null)."""
        return {
            "centers": self.centers,
            "rows": [
                {"name": r.name, "method": r.method, "adapted": list(r.adapted), "scores": json_scores(r.scores)}
                for r in self.rows
            ],
        }


def _format_hd95(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.1f}"


@dataclass
class TrainedModel:
    """A fine-tuned model folder and what its evaluation JSON says about it."""

    path: Path
    name: str
    method: str
    center: str | None
    is_adapter: bool
    peft_type: str | None


def describe_model_folder(path: str | Path) -> TrainedModel:
    """Read a folder written by `finetune_center.py`: its center and method from evaluation.json when present."""
    path = Path(path)
    info = {}
    if (path / EVALUATION_FILENAME).is_file():
        info = json.loads((path / EVALUATION_FILENAME).read_text())
    peft_type = None
    if is_adapter_folder(path):
        peft_type = read_adapter_config(path).get("peft_type")
    method = info.get("method") or ("adapter" if peft_type else "full")
    center = info.get("center")
    name = f"{method}:{center}" if center else path.name
    return TrainedModel(path, name, method, center, peft_type is not None, peft_type)


def center_matrix(
    base_model: str | Path,
    model_dirs: Sequence[str | Path],
    test_dataset: Dataset,
    num_labels: int,
    batch_size: int = 16,
    routed: bool = True,
) -> tuple[CenterMatrix, nn.Module | None]:
    """Evaluate the base and every fine-tuned model on every center of `test_dataset` (transformed rows).

    Rows: `base` (direct inference), then each model folder, then `routed` when `routed` and at least one visual
    prompt adapter is given: each center through the first visual prompt adapter trained for it, the base for the
    others, in mixed-center batches. Returns the matrix and the multi-adapter peft model used for routing (or None),
    which callers reuse for overlays.
    """
    from peft import PeftModel

    centers = sorted({str(c) for c in test_dataset["center"]})
    base, _ = load_base(base_model)
    rows = [
        MatrixRow(BASE_ROW, "direct inference", (), evaluate_segmentation(base, test_dataset, num_labels, batch_size))
    ]
    prompted: PeftModel | None = None  # one base carrying every visual prompt adapter, for routing
    route: dict[str, str] = {}
    for info in (describe_model_folder(p) for p in model_dirs):
        if info.peft_type == "VISUAL_PROMPT":
            # Module keys cannot hold dots: name the adapter by the row name with punctuation replaced.
            adapter_name = re.sub(r"\W", "_", info.name)
            if prompted is None:
                prompted = PeftModel.from_pretrained(copy.deepcopy(base), str(info.path), adapter_name=adapter_name)
            else:
                prompted.load_adapter(str(info.path), adapter_name=adapter_name)
            prompted.set_adapter(adapter_name)
            model = prompted.eval()
            if info.center and info.center not in route:
                route[info.center] = adapter_name
        elif info.is_adapter:
            model = PeftModel.from_pretrained(copy.deepcopy(base), str(info.path)).eval()
        else:
            model, _ = load_base(info.path)
        scores = evaluate_segmentation(model, test_dataset, num_labels, batch_size)
        rows.append(MatrixRow(info.name, info.method, (info.center,) if info.center else (), scores))
    if routed and prompted is not None:
        scores = evaluate_segmentation(
            prompted, test_dataset, num_labels, batch_size, adapter_for_center=lambda c: route.get(c, BASE_ADAPTER)
        )
        method = "routed: " + ", ".join(f"{c}→{n}" for c, n in sorted(route.items())) + "; others→base"
        rows.append(MatrixRow(ROUTED_ROW, method, tuple(sorted(route)), scores))
    return CenterMatrix(centers, rows, route), prompted


__all__ = [
    "BASE_ROW",
    "ROUTED_ROW",
    "CenterMatrix",
    "MatrixRow",
    "TrainedModel",
    "absent_classes_note",
    "center_matrix",
    "describe_model_folder",
    "evaluate_segmentation",
    "json_scores",
    "mean_dice",
    "predict",
]
