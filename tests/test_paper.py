"""The paper's protocol on a tiny folder dataset: every run scored, routed adapters forget nothing, outputs written."""

import json
import math

import pytest
from test_training import make_folder_dataset

from peft_medseg.experiments.paper import ProtocolConfig, run_protocol
from peft_medseg.experiments.paper_report import summarize


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory):
    root = make_folder_dataset(tmp_path_factory.mktemp("data") / "folder", images_per_center=12)
    cfg = ProtocolConfig(
        dataset=str(root),
        held_out=["C"],
        methods=("direct", "classifier", "vpt-deep", "vpt-deep-norms"),
        seeds=(0, 1),
        few_shot_cases=(2, None),
        few_shot_methods=("vpt-deep",),
        image_size=32,
        pretrain_epochs=2,
        finetune_epochs=1,
        measure_memory=True,
    )
    output = tmp_path_factory.mktemp("paper")
    rows = run_protocol(cfg, output, progress=lambda message: None)
    return cfg, output, rows


def test_every_planned_run_is_scored(protocol_run):
    cfg, _, rows = protocol_run
    plan = {(r["method"], r["seed"], r["num_train_cases"]) for r in rows}
    assert plan == {
        ("direct", 0, None),
        ("classifier", 0, None),
        ("classifier", 1, None),
        ("vpt-deep", 0, None),
        ("vpt-deep-norms", 0, None),
        ("vpt-deep-norms", 1, None),
        ("vpt-deep", 1, None),
        ("vpt-deep", 0, 2),
        ("vpt-deep", 1, 2),
    }
    for row in rows:
        assert 0 <= row["new_dice"] <= 1 and 0 <= row["old_dice_paper"] <= 1
        assert set(row["per_center_dice"]) == {"A", "B", "C"}
        assert row["old_dice_paper"] == pytest.approx((row["per_center_dice"]["A"] + row["per_center_dice"]["B"]) / 2)
    few = [r for r in rows if r["num_train_cases"] == 2]
    assert all(r["train_cases_used"] == 2 for r in few)
    vpt = [r for r in rows if r["method"] == "vpt-deep" and r["num_train_cases"] is None]
    assert all(r["train_cases_used"] > 2 for r in vpt)
    assert all(0 < r["trainable"] / r["total"] < 0.01 for r in vpt)


def test_routed_adapters_keep_old_centers_exactly_at_the_base(protocol_run):
    _, _, rows = protocol_run
    direct = next(r for r in rows if r["method"] == "direct")
    for row in rows:
        if row["method"] in ("vpt-deep", "vpt-deep-norms"):
            assert row["old_dice_routed"] == pytest.approx(direct["old_dice_paper"], abs=1e-6)
    assert all(math.isnan(r.get("old_dice_routed", math.nan)) for r in rows if r["method"] == "classifier")


def test_outputs_are_written_and_a_rerun_resumes(protocol_run, tmp_path):
    cfg, output, rows = protocol_run
    text = summarize(rows, output)
    assert "| vpt-deep |" in text and "Few-shot" in text
    for name in ("summary.md", "summary.csv", "runs.csv", "runs.jsonl", "figure-C.png", "memory-C.json"):
        assert (output / name).is_file(), name
    assert (output / "figure-C.png").read_bytes()[:4] == b"\x89PNG"
    memory = json.loads((output / "memory-C.json").read_text())
    assert set(memory) == {"classifier", "vpt-deep", "vpt-deep-norms"} and all(v >= 0 for v in memory.values())
    # A second run finds every row in runs.jsonl and the cached base: nothing is trained again.
    messages = []
    again = run_protocol(cfg, output, progress=messages.append)
    assert len(again) == len(rows)
    assert not any("seed=" in m for m in messages)


def test_share_of_full_gain_per_split_and_across_splits(tmp_path):
    """Hand-computed shares: (method - direct) / (full - direct), mean and worst split over two splits."""
    from peft_medseg.experiments.paper_report import share_of_gain

    def row(held_out, method, seed, new):
        return {"held_out": held_out, "method": method, "seed": seed, "num_train_cases": None, "new_dice": new,
                "new_hd95": 1.0, "old_dice_paper": 0.7, "trainable": 10, "total": 1000, "weights_bytes": 40,
                "seconds_per_epoch": 1.0}  # fmt: skip

    rows = [
        row("X", "direct", 0, 0.50), row("X", "full", 0, 0.70), row("X", "full", 1, 0.70),
        row("X", "vpt", 0, 0.68), row("X", "vpt", 1, 0.66),   # mean 0.67 -> 85%
        row("Y", "direct", 0, 0.40), row("Y", "full", 0, 0.60),
        row("Y", "vpt", 0, 0.45),                              # 25%
    ]  # fmt: skip
    assert share_of_gain(0.67, 0.5, 0.7) == pytest.approx(0.85)
    assert math.isnan(share_of_gain(0.6, 0.5, 0.5))  # full fine-tuning gained nothing: no share to report
    text = summarize(rows, tmp_path)
    assert "| vpt | 10 (1.00%) | 40 B | 0.670 ± 0.014 | 85% |" in text
    assert "| vpt | 1.00% | 2 | — | 0.560 | 55% | Y (25%) |" in text  # no validation Dice recorded in these rows


def test_share_interval_is_a_paired_bootstrap_over_test_images():
    """Two test images: every resample is (0, 0), (1, 1) or a mix, so the interval's ends can be worked out by hand."""
    from peft_medseg.experiments.paper_report import share_interval

    direct, full, method = [0.0, 0.0], [1.0, 0.5], [0.5, 0.5]
    # Resample (0, 0): 0.5 / 1 = 0.5; (1, 1): 0.5 / 0.5 = 1; mixed: 0.5 / 0.75. Each end holds a quarter of the mass.
    assert share_interval(method, direct, full) == pytest.approx((0.5, 1.0))
    # As good as full fine-tuning, or as the base, on every image: no uncertainty at all.
    assert share_interval(full, direct, full) == pytest.approx((1.0, 1.0))
    assert share_interval(direct, direct, full) == pytest.approx((0.0, 0.0))
    # Images are paired: an image that is hard for every model widens nothing.
    assert share_interval([0.5, 0.5, 0.1], [0.0, 0.0, 0.1], [1.0, 0.5, 0.1]) == pytest.approx((0.5, 1.0), abs=0.1)
    assert all(math.isnan(v) for v in share_interval([0.5], [0.0, 0.0], [1.0, 0.5]))  # not the same images
    assert all(math.isnan(v) for v in share_interval([], [], []))


def test_the_report_gives_each_share_its_interval_from_per_image_scores(tmp_path):
    def row(method, seed, per_image, held_out="X"):
        return {"held_out": held_out, "method": method, "seed": seed, "num_train_cases": None,
                "new_dice": sum(per_image) / len(per_image), "new_dice_per_image": per_image, "new_hd95": 1.0,
                "old_dice_paper": 0.7, "trainable": 10, "total": 1000, "weights_bytes": 40,
                "seconds_per_epoch": 1.0}  # fmt: skip

    rows = [
        row("direct", 0, [0.0, 0.0]),
        row("full", 0, [1.0, 0.5]),
        row("vpt", 0, [0.6, 0.5]), row("vpt", 1, [0.4, 0.5]),  # per image over seeds: [0.5, 0.5]
        # A second split where the method matches full fine-tuning on every image.
        row("direct", 0, [0.2, 0.2], "Y"), row("full", 0, [0.4, 0.6], "Y"), row("vpt", 0, [0.4, 0.6], "Y"),
    ]  # fmt: skip
    text = summarize(rows, tmp_path)
    assert "| 0.500 ± 0.071 | 67% [50–100%] |" in text
    assert "| 100% [100–100%] |" in text
    assert "| 83% | X (67% [50–100%]) |" in text  # the worst split carries its interval
    csv_text = (tmp_path / "summary.csv").read_text()
    assert "share_interval_low" in csv_text.splitlines()[0]
