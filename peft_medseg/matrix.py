"""The center x center matrix of a base, its adapters and fine-tuned models, under two protocols.

- *paper*: each model (the base, one adapter per new center, full fine-tuned models) is evaluated on every center's
  test split: one row per model, one column per test center;
- *routed*: each center goes through its own adapter and centers without one through the base, in mixed-center
  batches (`adapter_names`), which is how one deployed model serves every hospital.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset
from torch import nn

from .models3d import is_volume_model
from .scoring import absent_classes_note, evaluate_segmentation, json_scores
from .storage import EVALUATION_FILENAME, is_adapter_folder, load_base
from .visual_prompt import BASE_ADAPTER_NAME, PEFT_TYPE_NAME, read_adapter_config

BASE_ROW = "base"
ROUTED_ROW = "routed"


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
    # The unit of HD95: pixels of the model input for images, millimetres for volumes.
    hd95_unit: str = "pixels"

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
        footer = f"\n\nCells: mean foreground Dice / HD95 ({self.hd95_unit}); bold: the model's own center.\n"
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
        if info.peft_type == PEFT_TYPE_NAME:
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
            prompted,
            test_dataset,
            num_labels,
            batch_size,
            adapter_for_center=lambda c: route.get(c, BASE_ADAPTER_NAME),
        )
        method = "routed: " + ", ".join(f"{c}→{n}" for c, n in sorted(route.items())) + "; others→base"
        rows.append(MatrixRow(ROUTED_ROW, method, tuple(sorted(route)), scores))
    unit = "mm" if is_volume_model(base) else "pixels"
    return CenterMatrix(centers, rows, route, hd95_unit=unit), prompted


__all__ = [
    "BASE_ROW",
    "ROUTED_ROW",
    "CenterMatrix",
    "MatrixRow",
    "TrainedModel",
    "center_matrix",
    "describe_model_folder",
]
