"""3D data and the 3D pipeline: NIfTI cases, MONAI transforms, sliding-window scoring, recipes end to end."""

import csv
import json
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from peft_medseg.data import load_multicenter_dataset
from peft_medseg.data.validation import DataValidationError
from peft_medseg.data.volumes import (
    VolumeTransform,
    find_volume_cases,
    group_channel_files,
    load_volume_dataset,
    volume_input_transform,
)
from peft_medseg.models3d import UNETR3D, VolumePreprocessing
from peft_medseg.scoring import evaluate_segmentation, predict

ROOT = Path(__file__).resolve().parents[1]
AFFINE = np.array([[1.5, 0, 0, -30], [0, 1.5, 0, -20], [0, 0, 2.0, -10], [0, 0, 0, 1]])


def write_case(folder: Path, center: str, case: str, shape=(40, 36, 32), seed=0, split_channels=False, affine=AFFINE):
    """A two-channel case with a bright blob (label 1) and a small one (label 2)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.uint8)
    c = [s // 2 + rng.integers(-4, 5) for s in shape]
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    labels[((grid - np.array(c)[:, None, None, None]) ** 2).sum(0) < 36] = 1
    labels[((grid - (np.array(c) + 9)[:, None, None, None]) ** 2).sum(0) < 4] = 2
    image = np.stack(
        [rng.normal(100, 10, shape) + 80 * (labels > 0), rng.normal(1, 0.2, shape) + 3 * (labels > 0)], -1
    )
    (folder / center / "images").mkdir(parents=True, exist_ok=True)
    (folder / center / "labels").mkdir(parents=True, exist_ok=True)
    if split_channels:
        for channel in range(2):
            path = folder / center / "images" / f"{case}_{channel:04d}.nii.gz"
            nibabel.save(nibabel.Nifti1Image(image[..., channel].astype(np.float32), affine), path)
    else:
        nibabel.save(
            nibabel.Nifti1Image(image.astype(np.float32), affine), folder / center / "images" / f"{case}.nii.gz"
        )
    nibabel.save(nibabel.Nifti1Image(labels, affine), folder / center / "labels" / f"{case}.nii.gz")
    return image, labels


@pytest.fixture(scope="module")
def volume_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("volumes")
    for center_index, center in enumerate(["site_a", "site_b"]):
        for case in range(5):
            write_case(root, center, f"case{case}", seed=10 * center_index + case, split_channels=center == "site_b")
    return root


def test_cases_are_found_with_4d_and_channel_files_and_split_by_case(volume_root):
    rows = find_volume_cases(volume_root)
    assert len(rows) == 10
    by_center = {r["center"]: r for r in rows}
    assert len(by_center["site_a"]["image"]) == 1 and len(by_center["site_b"]["image"]) == 2
    assert by_center["site_b"]["image"][1].endswith("_0001.nii.gz")
    data, labels = load_volume_dataset(volume_root)
    assert labels == [0, 1, 2]
    assert len(data["train"]) + len(data["test"]) == 10
    train_cases = set(zip(data["train"]["center"], data["train"]["case_id"]))
    assert train_cases and not train_cases & set(zip(data["test"]["center"], data["test"]["case_id"]))
    via_entry, id2label = load_multicenter_dataset(str(volume_root), volumes=True)
    assert id2label == {0: "0", 1: "1", 2: "2"} and len(via_entry["train"]) == len(data["train"])


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing_label", "missing label"),
        ("shape", "expected the label's shape"),
        ("affine", "affine differs"),
        ("label_value", "label"),
        ("channel_gap", "without a gap"),
    ],
)
def test_bad_volume_folders_are_refused_naming_the_file(tmp_path, damage, message):
    write_case(tmp_path, "site", "ok", seed=1)
    write_case(tmp_path, "site", "bad", seed=2, split_channels=damage == "channel_gap")
    images, labels = tmp_path / "site" / "images", tmp_path / "site" / "labels"
    if damage == "missing_label":
        (labels / "bad.nii.gz").unlink()
    elif damage == "shape":
        nibabel.save(nibabel.Nifti1Image(np.zeros((8, 8, 8), np.uint8), AFFINE), labels / "bad.nii.gz")
    elif damage == "affine":
        nibabel.save(nibabel.Nifti1Image(np.zeros((40, 36, 32), np.uint8), AFFINE * 2), labels / "bad.nii.gz")
    elif damage == "label_value":
        nibabel.save(nibabel.Nifti1Image(np.full((40, 36, 32), 7, np.uint8), AFFINE), labels / "bad.nii.gz")
    elif damage == "channel_gap":
        (images / "bad_0001.nii.gz").rename(images / "bad_0002.nii.gz")
    with pytest.raises(DataValidationError, match=message) as error:
        find_volume_cases(tmp_path, num_labels=3)
    assert "bad" in str(error.value)


def test_channel_files_group_in_order():
    cases = group_channel_files([Path("a/x_0001.nii.gz"), Path("a/x_0000.nii.gz"), Path("a/y.nii"), Path("a/z.png")])
    assert cases == [("y", [Path("a/y.nii")]), ("x", [Path("a/x_0000.nii.gz"), Path("a/x_0001.nii.gz")])]


def test_volume_transform_crops_training_patches_and_keeps_whole_volumes_for_evaluation(volume_root):
    data, _ = load_volume_dataset(volume_root)
    preprocessing = VolumePreprocessing(roi_size=(32, 32, 32), num_channels=2, positive_fraction=1.0)
    train = data["train"].with_transform(VolumeTransform(preprocessing, train=True, seed=0))
    example = train[0]
    assert example["pixel_values"].shape == (2, 32, 32, 32) and example["labels"].dtype == torch.int64
    assert (example["labels"] > 0).any()  # positive_fraction=1: every crop is centred on foreground
    again = data["train"].with_transform(VolumeTransform(preprocessing, train=True, seed=0))[0]
    assert torch.equal(example["pixel_values"], again["pixel_values"])  # seeded per case and epoch
    evaluation = data["test"].with_transform(VolumeTransform(preprocessing, train=False))[0]
    assert evaluation["pixel_values"].shape == (2, 40, 36, 32)
    assert evaluation["spacing"] == [1.5, 1.5, 2.0]
    # Per-channel z-score.
    means = evaluation["pixel_values"].mean(dim=(1, 2, 3))
    assert torch.allclose(means, torch.zeros(2), atol=1e-4)


def test_reorientation_to_ras_flips_a_left_pointing_axis_and_prints_no_deprecation():
    preprocessing = VolumePreprocessing(roi_size=(4, 4, 4), num_channels=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transform = volume_input_transform(preprocessing)
        VolumeTransform(preprocessing, train=False)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    voxels = torch.arange(24.0).reshape(1, 2, 3, 4)
    scan = MetaTensor(voxels, affine=torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0])))  # first axis points left (LAS)
    out = transform.transforms[0](scan)  # the orientation step alone, before the z-score
    assert torch.equal(out.as_tensor(), voxels.flip(1))
    assert torch.allclose(out.affine.diagonal()[:3], torch.ones(3, dtype=out.affine.dtype))


def small_unetr(img=32, seed=0):
    torch.manual_seed(seed)
    return UNETR3D(
        in_channels=2, out_channels=3, img_size=(img,) * 3, feature_size=4, hidden_size=32, mlp_dim=64, num_heads=2
    ).eval()


def test_sliding_window_prediction_agrees_with_direct_forwards():
    model = small_unetr()
    with torch.no_grad():
        x = torch.randn(1, 2, 32, 32, 32)
        # The volume is the patch: one window, the direct forward exactly.
        assert torch.equal(predict(model, x), model(x).argmax(1))
        # A 64 x 32 x 64 volume without overlap: four windows, each the direct forward of its block.
        big = torch.randn(1, 2, 64, 32, 64)
        tiled = predict(model, big, overlap=0.0)
        for i in (0, 32):
            for k in (0, 32):
                block = big[:, :, i : i + 32, :, k : k + 32]
                assert torch.equal(tiled[:, i : i + 32, :, k : k + 32], model(block).argmax(1))


def test_volume_scores_dice_by_hand_and_hd95_in_millimetres(volume_root):
    data, _ = load_volume_dataset(volume_root, centers=["site_a"])
    test = data["test"].with_transform(VolumeTransform(VolumePreprocessing(roi_size=(32, 32, 32)), train=False))

    # Score one reference against itself shifted by one voxel: Dice and HD95 by hand.
    reference = test[0]["labels"].numpy()
    shifted = np.roll(reference, 1, axis=0)
    from peft_medseg.metrics import dice_per_class, hd95

    dice = dice_per_class(shifted, reference, 3)
    for label in (1, 2):
        a, b = shifted == label, reference == label
        assert dice[label] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    assert hd95(shifted, reference, 3, spacing=[1.5, 1.5, 2.0])[1] == pytest.approx(1.5)
    # The pipeline: a UNETR scored on whole volumes; HD95 is in mm, and absent classes are listed, not averaged.
    scores = evaluate_segmentation(small_unetr(), test, num_labels=3)
    assert set(scores) == {"site_a"} and 0.0 <= scores["site_a"]["dice"] <= 1.0


@pytest.mark.slow
def test_3d_recipes_pretrain_finetune_and_predict_end_to_end(volume_root, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    common = ["--dataset", str(volume_root), "--max_train_steps", "2", "--batch_size", "1", "--num_epochs", "1"]

    def run(*args):
        result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    base_spec = tmp_path / "base"
    run("recipes/pretrain_base.py", "--base", "unetr-tiny", "--output_dir", str(base_spec), *common)
    preprocessing = json.loads((base_spec / "volume_preprocessing.json").read_text())
    assert preprocessing["roi_size"] == [64, 64, 64] and preprocessing["num_channels"] == 2
    adapter = tmp_path / "adapter"
    run(
        "recipes/finetune_center.py",
        "--base_model",
        str(base_spec),
        "--method",
        "vpt-deep-norms",
        "--new_center",
        "site_b",
        "--output_dir",
        str(adapter),
        *common,
    )
    evaluation = json.loads((adapter / "evaluation.json").read_text())
    assert set(evaluation["metrics"]) == {"site_a", "site_b"}
    assert (adapter / "adapter_model.safetensors").stat().st_size < 200_000
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_type"] == "UNETR" and config["block_class"] == "TransformerBlock"
    # Masks for a NIfTI scan, in its own geometry (shape and affine), through the adapter.
    out = tmp_path / "masks"
    scan = volume_root / "site_b" / "images"
    run(
        "recipes/predict.py",
        "--base_model",
        str(base_spec),
        "--adapter",
        str(adapter),
        "--output_dir",
        str(out),
        str(scan / "case0_0000.nii.gz"),
        str(scan / "case0_0001.nii.gz"),
    )
    mask = nibabel.load(next((out / "masks").glob("*.nii.gz")))
    # The adapter carries its center signature (3D: the base's features of a volume's central patch), so a scan
    # can be routed by it: to the adapter or, if unlike the center's volumes, to the base.
    assert (adapter / "center_signature.safetensors").is_file()
    routed = tmp_path / "routed"
    run(
        "recipes/predict.py", "--base_model", str(base_spec), "--adapters", str(adapter), "--route", "auto",
        "--output_dir", str(routed), str(scan / "case0_0000.nii.gz"), str(scan / "case0_0001.nii.gz"),
    )  # fmt: skip
    with open(routed / "predictions.csv") as handle:
        row = next(csv.DictReader(handle))
    assert row["route"] in ("adapter", "__base__") and row["nearest_center"] == "adapter"
    reference = nibabel.load(volume_root / "site_b" / "labels" / "case0.nii.gz")
    assert mask.shape == reference.shape and np.allclose(mask.affine, reference.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}


def test_synthetic_volumes_are_deterministic_two_channel_nifti_with_small_lesions(tmp_path):
    from peft_medseg.data import synthetic3d

    root = synthetic3d.generate_synthetic_volumes(tmp_path / "s3d", seed=3, cases_per_center=1)
    rows = find_volume_cases(root, num_labels=3)
    assert sorted(r["center"] for r in rows) == sorted(synthetic3d.CENTERS_3D)
    image = nibabel.load(rows[0]["image"][0])
    size = synthetic3d.VOLUME_SIZE
    assert image.shape == (size, size, size, 2) and image.get_data_dtype() == np.int16
    assert np.allclose(image.header.get_zooms()[:3], synthetic3d.VOXEL_MM)
    info = json.loads((root / "info.json").read_text())
    assert info["id2label"] == {"0": "background", "1": "primary_lesion", "2": "satellite_lesions"}
    # Lesions are small: under 1% of the volume in every case.
    for row in rows:
        labels = np.asarray(nibabel.load(row["label"]).dataobj)
        assert (labels > 0).mean() < 0.01
    anatomy = synthetic3d._downsampled_anatomy()
    profile = synthetic3d.CENTER_PROFILES_3D[0]
    first = synthetic3d._render_case(profile, anatomy, np.random.default_rng([3, 0, 0]))
    again = synthetic3d._render_case(profile, anatomy, np.random.default_rng([3, 0, 0]))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    stored = np.asarray(nibabel.load(root / profile.name / "images" / f"{profile.name}_000.nii.gz").dataobj)
    assert np.array_equal(stored, first[0])


DP_3D_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
from peft_medseg.data.volumes import load_volume_dataset
from peft_medseg.models3d import UNETR3D, default_volume_preprocessing
from peft_medseg.training import *
root, batch_size, out, precision = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
data, _ = load_volume_dataset(root)
rows = data["train"].filter(lambda c: c == "site_a", input_columns="center")
train, validation = rows.select(range(2)), rows.select(range(2, len(rows)))
torch.manual_seed(0)
base = UNETR3D(in_channels=2, out_channels=3, img_size=(32, 32, 32), feature_size=4, hidden_size=32, mlp_dim=64,
               num_heads=2, norm_name=("instance", {"affine": True}))
processor = default_volume_preprocessing(base)
train.set_transform(train_transform(processor, 0)); validation.set_transform(eval_transform(processor))
model = prepare_model(base, "vpt-deep-head", num_virtual_tokens=2, prompt_dropout=0.0)
enable_gradient_checkpointing(model)
accelerator = make_accelerator(mixed_precision=precision)
config = TrainingConfig(learning_rate=3e-2, num_epochs=1, batch_size=batch_size)
train_segmentation(model, train, validation, 3, config, accelerator)
state = {n: p.detach().float().contiguous() for n, p in accelerator.unwrap_model(model).named_parameters()
         if p.requires_grad}
name = f"{precision}-rank{accelerator.process_index}-of-{accelerator.num_processes}"
save_file(state, f"{out}/{name}.safetensors")
if accelerator.is_main_process:  # one writer: two ranks printing at once interleave their lines
    print(accelerator.distributed_type, accelerator.num_processes, accelerator.mixed_precision)
"""


def test_3d_training_data_parallel_on_two_processes_equals_one_and_runs_in_bf16(volume_root, tmp_path):
    """The default method on a 3D base, activation checkpointing on: two CPU processes (torchrun, gloo) with one
    patch each end where one process with both patches per step ends; bf16 autocast trains too."""
    from safetensors.torch import load_file

    script = tmp_path / "dp3d.py"
    script.write_text(DP_3D_SCRIPT)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def run(*args):
        result = subprocess.run(
            [sys.executable, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port", port]
    assert "MULTI_CPU 2 no" in run(*torchrun, script, volume_root, 1, tmp_path, "no")
    run(script, volume_root, 2, tmp_path, "no")
    assert "bf16" in run(script, volume_root, 2, tmp_path, "bf16")
    rank0, rank1 = (load_file(tmp_path / f"no-rank{r}-of-2.safetensors") for r in (0, 1))
    single, bf16 = (
        load_file(tmp_path / "no-rank0-of-1.safetensors"),
        load_file(tmp_path / "bf16-rank0-of-1.safetensors"),
    )
    assert any(".head_update." in key for key in single) and any("modules_to_save" in key for key in single)
    assert not any(".vpt_depthwise." in key for key in single)  # the depthwise head filters are 2D-only
    for key in rank0:
        torch.testing.assert_close(rank1[key], rank0[key], rtol=0, atol=0)  # DDP keeps the ranks identical
        # One Adam step of 3e-2: equal up to summation order (an element whose gradient is near zero moves by a
        # noise-sized fraction of the step, 2e-5 seen).
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-4, atol=1e-4, msg=key)
        assert torch.isfinite(bf16[key]).all()
    # bf16 follows the fp32 run's direction without reproducing it bit for bit.
    moved = [key for key in single if ".vpt_prompt." in key]
    assert moved and all(not torch.equal(bf16[key], single[key]) for key in moved)


def test_3d_training_resumed_mid_epoch_equals_the_uninterrupted_run(volume_root, tmp_path):
    """Patch crops and augmentation are seeded per (seed, epoch, case), so a run resumed from a mid-epoch checkpoint
    (here: the state after its first step, as a kill would leave it) ends bit for bit where the straight run ends."""
    import shutil

    from peft_medseg.models3d import default_volume_preprocessing
    from peft_medseg.training import (
        TrainingConfig,
        eval_transform,
        make_accelerator,
        prepare_model,
        train_segmentation,
        train_transform,
    )

    data, _ = load_volume_dataset(volume_root, centers=["site_a"])
    rows = data["train"]
    processor = default_volume_preprocessing(small_unetr())

    def run(checkpoint_dir, resume=None, init_seed=0):
        train, validation = rows.select(range(2)), rows.select(range(2, len(rows)))
        train.set_transform(train_transform(processor, 0))
        validation.set_transform(eval_transform(processor))
        torch.manual_seed(init_seed)
        model = prepare_model(small_unetr(), "vpt-deep", num_virtual_tokens=2, prompt_dropout=0.0)
        config = TrainingConfig(
            learning_rate=3e-2, num_epochs=2, batch_size=1, checkpoint_dir=str(checkpoint_dir), checkpointing_steps=1,
            resume_from_checkpoint=resume,
        )  # fmt: skip
        accelerator = make_accelerator()
        result = train_segmentation(model, train, validation, 3, config, accelerator)
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return result, trained

    straight_result, straight = run(tmp_path / "straight")
    assert straight_result.completed_steps == 4
    shutil.copytree(tmp_path / "straight" / "step-000001", tmp_path / "killed" / "step-000001")
    # Other initial prompts: only what the checkpoint holds can make the runs agree.
    resumed_result, resumed = run(tmp_path / "killed", resume="latest", init_seed=1)
    assert resumed_result.completed_steps == 4 and resumed.keys() == straight.keys()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
