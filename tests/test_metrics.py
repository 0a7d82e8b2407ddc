import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from peft_medseg.metrics import (
    aggregate_by_center,
    dice_per_class,
    hd95,
    hd95_binary,
    iou_per_class,
    load_metric,
    mean_foreground,
    metric_path,
    stack_slices,
    volume_dice,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def square(size=16, top=4, left=4, side=6, label=1):
    mask = np.zeros((size, size), dtype=np.int64)
    mask[top : top + side, left : left + side] = label
    return mask


def brute_force_hd95(prediction, reference, spacing=(1.0, 1.0)):
    # Independent reference: surface = foreground pixels with a 4-neighbour outside (padding counts as outside),
    # all pairwise distances, max of the two directed 95th percentiles.
    def surface_points(mask):
        padded = np.pad(mask.astype(bool), 1)
        points = []
        for r in range(mask.shape[0]):
            for c in range(mask.shape[1]):
                if padded[r + 1, c + 1] and not (
                    padded[r, c + 1] and padded[r + 2, c + 1] and padded[r + 1, c] and padded[r + 1, c + 2]
                ):
                    points.append((r * spacing[0], c * spacing[1]))
        return np.array(points)

    a, b = surface_points(prediction), surface_points(reference)
    distances = cdist(a, b)
    return max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95))


def test_dice_and_iou_hand_computed():
    reference = np.array([[0, 1, 1], [0, 1, 2], [2, 2, 0]])
    prediction = np.array([[0, 1, 0], [0, 1, 2], [2, 1, 1]])
    # class 1: ref 3 px, pred 4 px, overlap 2 -> Dice 4/7, IoU 2/5; class 2: ref 3, pred 2, overlap 2 -> 4/5, 2/3
    # class 0: ref 3 (0,0),(1,0),(2,2); pred 3 (0,0),(0,2),(1,0); overlap 2 -> Dice 4/6, IoU 2/4
    np.testing.assert_allclose(dice_per_class(prediction, reference, 3), [4 / 6, 4 / 7, 4 / 5])
    np.testing.assert_allclose(iou_per_class(prediction, reference, 3), [2 / 4, 2 / 5, 2 / 3])
    assert mean_foreground(dice_per_class(prediction, reference, 3)) == pytest.approx((4 / 7 + 4 / 5) / 2)


def test_dice_empty_conventions():
    empty = np.zeros((8, 8), dtype=int)
    full = square(8, 2, 2, 3)
    # Class 1 absent from both -> 1.0; present in only one -> 0.0 (both directions).
    assert dice_per_class(empty, empty, 2)[1] == 1.0
    assert iou_per_class(empty, empty, 2)[1] == 1.0
    assert dice_per_class(empty, full, 2)[1] == 0.0
    assert dice_per_class(full, empty, 2)[1] == 0.0
    assert iou_per_class(full, empty, 2)[1] == 0.0


def test_ignore_index_excluded():
    reference = np.array([[1, 1, 255, 255]])
    prediction = np.array([[1, 1, 0, 0]])
    np.testing.assert_allclose(dice_per_class(prediction, reference, 2, ignore_index=255), [1.0, 1.0])
    # Without ignore_index the 255 pixels are just unknown classes and background predictions are wrong there.
    assert dice_per_class(prediction, reference, 2)[0] == 0.0


def test_hd95_hand_computed_and_spacing():
    reference = square(20, 5, 5, 6)
    shifted = square(20, 7, 5, 6)  # moved 2 rows down
    assert hd95_binary(reference, reference) == 0.0
    assert hd95_binary(shifted, reference) == pytest.approx(2.0)
    # Rows are 3 mm apart, columns 1 mm: the same 2-row shift is 6 mm.
    assert hd95_binary(shifted, reference, spacing=(3.0, 1.0)) == pytest.approx(6.0)
    assert hd95_binary(shifted, reference, spacing=(1.0, 3.0)) == pytest.approx(2.0)


def test_hd95_empty_conventions():
    empty = np.zeros((10, 10), dtype=int)
    mask = square(10, 2, 2, 3)
    assert hd95_binary(empty, empty) == 0.0
    assert np.isnan(hd95_binary(empty, mask))
    assert np.isnan(hd95_binary(mask, empty))
    per_class = hd95(mask, empty, num_labels=3)
    assert np.isnan(per_class[1]) and per_class[2] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    # Random smooth blobs: thresholded smoothed noise.
    prediction = ndimage.gaussian_filter(rng.normal(size=(32, 32)), 3) > 0.05
    reference = ndimage.gaussian_filter(rng.normal(size=(32, 32)), 3) > 0.05
    for spacing in [(1.0, 1.0), (0.7, 1.9)]:
        expected = brute_force_hd95(prediction, reference, spacing)
        assert hd95_binary(prediction, reference, spacing) == pytest.approx(expected, rel=1e-9)


def test_hd95_3d_volume():
    reference = np.zeros((6, 12, 12), dtype=int)
    reference[1:5, 3:9, 3:9] = 1
    prediction = np.roll(reference, 1, axis=0)
    assert hd95(prediction, reference, 2, spacing=(5.0, 1.0, 1.0))[1] == pytest.approx(5.0)


def test_aggregate_by_center_is_nan_aware():
    values = [np.array([1.0, 0.5]), np.array([1.0, np.nan]), np.array([0.0, 1.0])]
    result = aggregate_by_center(values, ["b", "b", "a"])
    assert list(result) == ["a", "b"]
    np.testing.assert_allclose(result["b"], [1.0, 0.5])
    np.testing.assert_allclose(result["a"], [0.0, 1.0])
    assert aggregate_by_center([0.2, 0.4, np.nan], ["x", "x", "x"])["x"] == pytest.approx(0.3)


def test_volume_dice_regroups_slices():
    rng = np.random.default_rng(0)
    volumes = {case: rng.integers(0, 3, size=(4, 8, 8)) for case in ("c1", "c2")}
    predictions_3d = {case: np.where(rng.random(v.shape) < 0.8, v, 0) for case, v in volumes.items()}
    # Slices arrive shuffled and interleaved across cases.
    entries = [(case, k) for case in volumes for k in range(4)]
    order = rng.permutation(len(entries))
    entries = [entries[i] for i in order]
    result = volume_dice(
        [predictions_3d[c][k] for c, k in entries],
        [volumes[c][k] for c, k in entries],
        [c for c, _ in entries],
        [k for _, k in entries],
        num_labels=3,
    )
    for case in volumes:
        np.testing.assert_allclose(result[case], dice_per_class(predictions_3d[case], volumes[case], 3))
    stacked = stack_slices([volumes["c1"][k] for k in (2, 0, 3, 1)], [2, 0, 3, 1], axis=0)
    np.testing.assert_array_equal(stacked, volumes["c1"])


def test_evaluate_modules_match_functional():
    rng = np.random.default_rng(0)
    references = [rng.integers(0, 3, size=(12, 12)) for _ in range(4)]
    predictions = [np.where(rng.random(r.shape) < 0.7, r, 1) for r in references]
    centers = ["a", "a", "b", "b"]

    dice = load_metric("dice").compute(predictions=predictions, references=references, num_labels=3, centers=centers)
    per_image = [dice_per_class(p, r, 3) for p, r in zip(predictions, references)]
    np.testing.assert_allclose(dice["per_class_dice"], np.mean(per_image, axis=0))
    assert dice["mean_dice"] == pytest.approx(np.mean(np.asarray(per_image)[:, 1:]))
    assert dice["per_center_dice"]["b"] == pytest.approx(np.mean(np.asarray(per_image[2:])[:, 1:]))

    result = load_metric("hd95").compute(
        predictions=predictions, references=references, num_labels=3, spacing=[2.0, 1.0]
    )
    expected = np.mean([hd95(p, r, 3, spacing=(2.0, 1.0)) for p, r in zip(predictions, references)], axis=0)
    np.testing.assert_allclose(result["per_class_hd95"], expected)

    volume = load_metric("volume_dice").compute(
        predictions=predictions,
        references=references,
        num_labels=3,
        case_ids=["x", "x", "y", "y"],
        slice_indices=[0, 1, 0, 1],
    )
    np.testing.assert_allclose(
        volume["per_case_dice"]["y"], dice_per_class(np.stack(predictions[2:]), np.stack(references[2:]), 3)
    )


def test_metric_path_unknown_name():
    with pytest.raises(ValueError, match="expected one of"):
        metric_path("accuracy")


def test_evaluate_load_by_path_offline_in_fresh_process(tmp_path):
    script = (
        "import json, evaluate\n"
        "from peft_medseg.metrics import metric_path\n"
        "out = {}\n"
        "for name in ('dice', 'hd95', 'volume_dice'):\n"
        "    out[name] = type(evaluate.load(metric_path(name))).__name__\n"
        "ref = [[0, 1], [1, 1]]\n"
        "out['value'] = evaluate.load(metric_path('dice')).compute(predictions=[ref], references=[ref], num_labels=2)['mean_dice']\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    out = json.loads(completed.stdout.strip().splitlines()[-1])
    assert out == {"dice": "Dice", "hd95": "HD95", "volume_dice": "VolumeDice", "value": 1.0}
