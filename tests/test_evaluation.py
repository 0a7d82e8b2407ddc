"""Evaluation: per-center scores, the center x center matrix, routing, and the files the recipe writes."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from test_training import IMAGE_SIZE, NUM_LABELS, make_folder_dataset, tiny_base

from peft_medseg.matrix import BASE_ROW, ROUTED_ROW, center_matrix
from peft_medseg.models import build_image_processor
from peft_medseg.plots import plot_dice_heatmap
from peft_medseg.scoring import evaluate_segmentation
from peft_medseg.training import eval_transform, load_multicenter_dataset, prepare_model, save_finetuned


class Oracle(torch.nn.Module):
    """Predicts the label stored in channel 0 of the input: a perfect segmenter for the metric checks."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, pixel_values):
        labels = pixel_values[:, 0].round().long()
        logits = torch.nn.functional.one_hot(labels, NUM_LABELS).permute(0, 3, 1, 2).float()
        return type("Output", (), {"logits": logits})()


def test_perfect_predictions_score_dice_one_and_hd95_zero_per_center():
    rows = []
    for center in ("A", "B"):
        labels = torch.zeros(16, 16, dtype=torch.long)
        labels[4:9, 4:9], labels[10:14, 2:6] = 1, 2
        rows.append({"pixel_values": labels.float().expand(3, 16, 16), "labels": labels, "center": center})
    scores = evaluate_segmentation(Oracle(), rows, NUM_LABELS)
    per_class = {label: 1.0 for label in range(1, NUM_LABELS)}
    perfect = {
        "dice": 1.0,
        "hd95": 0.0,
        "absent_classes": [],
        "dice_per_class": per_class,
        "dice_aggregated": per_class,
        "dice_per_image": [1.0],
    }
    assert scores == {"A": perfect, "B": perfect}
    rows[1]["labels"] = torch.zeros_like(rows[1]["labels"])  # B's reference has no foreground: prediction all wrong
    scores = evaluate_segmentation(Oracle(), rows, NUM_LABELS)
    assert scores["A"]["dice"] == 1.0 and scores["B"]["dice"] == 0.0 and np.isnan(scores["B"]["hd95"])


def test_per_class_dice_is_the_mean_over_images_and_aggregated_dice_pools_voxels_by_hand():
    """Two images of one center; class 2 is only in the second, and missed there."""
    rows = []
    for predicted, reference in (
        ({1: np.s_[0:4, 0:2]}, {1: np.s_[0:4, 0:4]}),  # class 1: 8 of 16 found; class 2 in neither
        ({1: np.s_[0:2, 0:2]}, {1: np.s_[0:2, 0:2], 2: np.s_[8:10, 8:10]}),  # class 1 exact; class 2 missed
    ):
        prediction, labels = torch.zeros(16, 16), torch.zeros(16, 16, dtype=torch.long)
        for label, where in predicted.items():
            prediction[where] = label
        for label, where in reference.items():
            labels[where] = label
        rows.append({"pixel_values": prediction.expand(3, 16, 16), "labels": labels, "center": "A"})
    scores = evaluate_segmentation(Oracle(), rows, NUM_LABELS, compute_hd95=False)["A"]
    # Per image: class 1 scores 2*8/(8+16) and 1; class 2 scores 1 (absent from both) and 0.
    assert scores["dice_per_class"] == pytest.approx({1: (2 * 8 / 24 + 1) / 2, 2: (1 + 0) / 2})
    # Pooled: class 1 2*(8+4)/((8+16)+(4+4)); class 2 finds none of its 4 pixels.
    assert scores["dice_aggregated"] == pytest.approx({1: 2 * 12 / 32, 2: 0.0})
    assert scores["dice"] == pytest.approx(((2 * 8 / 24 + 1) / 2 + (1 + 0) / 2) / 2)
    # Each image's mean over its classes, in dataset order: what `dice` averages.
    assert scores["dice_per_image"] == pytest.approx([(2 * 8 / 24 + 1) / 2, (1 + 0) / 2])


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A saved tiny base, VPT adapters for centers A and B (perturbed so they differ), a full model for C."""
    root = tmp_path_factory.mktemp("matrix")
    data, _ = load_multicenter_dataset(str(make_folder_dataset(root / "data")))
    processor = build_image_processor(IMAGE_SIZE)
    tiny_base().save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    folders = []
    for i, center in enumerate(("A", "B")):
        model = prepare_model(tiny_base(), "vpt-deep", num_virtual_tokens=3)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn_like(parameter) * (3.0 if "prompt" in name else 0.5) * (i + 1))
        save_finetuned(model, root / f"vpt-{center}", evaluation={"center": center, "method": "vpt-deep"})
        folders.append(root / f"vpt-{center}")
    full = tiny_base(seed=1)
    save_finetuned(full, root / "full-C", processor, {"center": "C", "method": "full"})
    folders.append(root / "full-C")
    test = data["test"]
    test.set_transform(eval_transform(processor))
    return root, folders, test


def test_matrix_shape_values_and_routed_equals_each_adapter_alone(tiny_setup, tmp_path):
    root, folders, test = tiny_setup
    matrix, prompted = center_matrix(root / "base", folders, test, NUM_LABELS, batch_size=4)
    assert [row.name for row in matrix.rows] == [BASE_ROW, "vpt-deep:A", "vpt-deep:B", "full:C", ROUTED_ROW]
    assert matrix.centers == ["A", "B", "C"]
    values = matrix.dice_array()
    assert values.shape == (5, 3) and ((values >= 0) & (values <= 1)).all()
    assert all(row.scores[c]["hd95"] >= 0 or np.isnan(row.scores[c]["hd95"]) for row in matrix.rows for c in "ABC")
    # The adapters really change the predictions, otherwise the routing check below would be vacuous.
    assert matrix.row("vpt-deep:A").scores["A"] != matrix.row(BASE_ROW).scores["A"]
    assert matrix.row("vpt-deep:B").scores["B"] != matrix.row(BASE_ROW).scores["B"]
    routed = matrix.row(ROUTED_ROW)
    assert routed.adapted == ("A", "B") and matrix.routes == {"A": "vpt_deep_A", "B": "vpt_deep_B"}
    expected = {"A": "vpt-deep:A", "B": "vpt-deep:B", "C": BASE_ROW}
    for center, source in expected.items():
        for key in ("dice", "hd95"):
            np.testing.assert_allclose(routed.scores[center][key], matrix.row(source).scores[center][key], atol=1e-9)
    # Routing leaves centers without an adapter exactly as the base: no forgetting by construction.
    assert matrix.forgetting(routed) == 0.0
    base = matrix.row(BASE_ROW).scores
    own = matrix.row("vpt-deep:A")
    assert matrix.forgetting(own) == pytest.approx(np.mean([own.scores[c]["dice"] - base[c]["dice"] for c in "BC"]))

    markdown = matrix.to_markdown()
    assert sum(line.startswith("| ") for line in markdown.splitlines()) == 1 + 5 and "forgetting" in markdown
    matrix.write_csv(tmp_path / "m.csv")
    with open(tmp_path / "m.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 5 * 3
    plot_dice_heatmap(matrix, tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
