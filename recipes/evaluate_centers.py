"""Evaluate the base, each center's adapter and full fine-tuned models on every center: the center x center matrix.

    python recipes/evaluate_centers.py --base_model outputs/base-tiny \
        --models outputs/vpt-deep-flair_1p5t outputs/full-flair_1p5t --output_dir outputs/eval

Rows: the base (direct inference), each model folder written by finetune_center.py, and "routed" (each center through
its own visual prompt adapter in one mixed-center batch, the base for centers without one). Columns: each center's
test split. Cells: mean foreground Dice / HD95 (pixels; millimetres for a 3D base, whose test volumes are segmented
whole by sliding-window inference). "forgetting": mean Dice change vs the base on the centers a
row was not adapted to. Writes matrix.md, matrix.csv, matrix.json, dice_heatmap.png and overlays.png.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from peft_medseg import BASE_ADAPTER_NAME
from peft_medseg.data import load_multicenter_dataset, parse_label_map
from peft_medseg.matrix import center_matrix
from peft_medseg.models import model_num_labels
from peft_medseg.models3d import VolumePreprocessing
from peft_medseg.plots import plot_dice_heatmap, plot_overlays
from peft_medseg.scoring import json_scores, predict
from peft_medseg.storage import claim_output_dir, load_base
from peft_medseg.training import eval_transform
from peft_medseg.training.cli import parse_arguments, run_recipe


@dataclass
class EvaluateArguments:
    """The base, the models to compare with it, and the test data."""

    base_model: str = field(metadata={"help": "The base saved by pretrain_base.py."})
    output_dir: str = field(metadata={"help": "Where matrix.md/csv/json, dice_heatmap.png and overlays.png go."})
    models: list[str] = field(default_factory=list, metadata={"help": "Folders written by finetune_center.py."})
    dataset: str = field(
        default="synthetic",
        metadata={
            "help": "'synthetic' ('synthetic3d' for a 3D base), a folder <root>/<center>/images|masks (NIfTI "
            "images|labels for a 3D base) or a datasets id."
        },
    )
    centers: list[str] | None = field(default=None, metadata={"help": "Test centers (default: all)."})
    label_map: list[str] | None = field(default=None, metadata={"help": "VALUE=ID, e.g. 255=1 for 0/255 masks."})
    batch_size: int = field(default=16, metadata={"help": "Scoring batch size."})
    num_overlays: int = field(default=2, metadata={"help": "Test images per center in overlays.png."})


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_arguments((EvaluateArguments,), argv, description=__doc__)
    base, processor = load_base(args.base_model)
    num_labels = model_num_labels(base)
    data, _ = load_multicenter_dataset(
        args.dataset,
        args.centers,
        num_labels,
        label_map=parse_label_map(args.label_map),
        volumes=isinstance(processor, VolumePreprocessing),
    )
    for folder in args.models:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: no such model folder (--models takes folders of finetune_center.py).")
    with claim_output_dir(args.output_dir) as output_dir:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_matrix(args, data, processor, num_labels, output_dir)


def write_matrix(args, data, processor, num_labels: int, output_dir: Path) -> None:
    test = data["test"]
    test.set_transform(eval_transform(processor))

    matrix, prompted = center_matrix(args.base_model, args.models, test, num_labels, args.batch_size)
    markdown = matrix.to_markdown()
    (output_dir / "matrix.md").write_text(markdown)
    matrix.write_csv(output_dir / "matrix.csv")
    (output_dir / "matrix.json").write_text(json.dumps(matrix.to_json(), indent=2))
    plot_dice_heatmap(matrix, output_dir / "dice_heatmap.png")
    print(markdown)

    # Side by side for each adapted center: the base's direct inference vs the model trained for it.
    base_scores = matrix.row("base").scores
    for row in matrix.rows[1:]:
        for center in row.adapted:
            if row.name != "routed":
                print(
                    f"{center}: direct inference Dice {base_scores[center]['dice']:.3f} | "
                    f"{row.method} Dice {row.scores[center]['dice']:.3f}"
                )
    (output_dir / "base_scores.json").write_text(json.dumps(json_scores(base_scores), indent=2))

    # Overlays: a few test images per center, reference, base and routed predictions.
    per_center: dict[str, list[int]] = {}
    for index, center in enumerate(test["center"]):
        if len(per_center.setdefault(center, [])) < args.num_overlays:
            per_center[center].append(index)
    indices = [i for center in sorted(per_center) for i in per_center[center]]
    rows = [test[i] for i in indices]
    base, _ = load_base(args.base_model)
    # One at a time: volumes differ in size. A volume is shown at its axial slice with the most reference foreground.
    panels = {"reference": [r["labels"].numpy() for r in rows]}
    panels["base"] = [predict(base, r["pixel_values"][None])[0].numpy() for r in rows]
    if prompted is not None:
        names = [matrix.routes.get(r["center"], BASE_ADAPTER_NAME) for r in rows]
        panels["routed"] = [predict(prompted, r["pixel_values"][None], [n])[0].numpy() for r, n in zip(rows, names)]
    images = [r["pixel_values"][0].numpy() for r in rows]
    if images[0].ndim == 3:
        slices = [int((labels > 0).sum(axis=(0, 1)).argmax()) for labels in panels["reference"]]
        images = [image[..., z] for image, z in zip(images, slices)]
        panels = {name: [maps[..., z] for maps, z in zip(column, slices)] for name, column in panels.items()}
    plot_overlays(images, panels, [r["center"] for r in rows], output_dir / "overlays.png", num_labels)
    print(f"Wrote {output_dir}/matrix.md, matrix.csv, matrix.json, dice_heatmap.png, overlays.png")


if __name__ == "__main__":
    run_recipe(main)
