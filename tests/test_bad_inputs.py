"""Bad inputs and faults: each gets its exact error, a message naming the file or value, and changes nothing.

"Changes nothing": the caller's model (state dict and outputs), the output folder and any earlier adapter are exactly
as they were. Recipes are run in this process through `run_recipe`, as their command line runs them.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from PIL import Image
from test_training import IMAGE_SIZE, NUM_LABELS, make_folder_dataset
from test_training import tiny_base as tiny_upernet

from peft_medseg import VisualPromptConfig
from peft_medseg.data import DataValidationError, load_folder_dataset, load_nifti_dataset
from peft_medseg.models import build_image_processor
from peft_medseg.scoring import absent_classes_note, evaluate_segmentation
from peft_medseg.storage import (
    OutputDirError,
    atomic_directory,
    check_safe_name,
    claim_output_dir,
    load_base,
    load_finetuned,
    save_finetuned,
)
from peft_medseg.training import (
    TrainingConfig,
    load_multicenter_dataset,
    make_accelerator,
    parse_label_map,
    prepare_model,
    split_validation,
    train_segmentation,
    train_transform,
)
from peft_medseg.training.cli import run_recipe

REPO = Path(__file__).resolve().parents[1]


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor], pixels: torch.Tensor, logits: torch.Tensor) -> None:
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    assert not any(hasattr(m, "visual_prompt") for m in model.modules())
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).logits, logits, rtol=0, atol=0)


def folder_state(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def fails_with_one_line(capsys, main, argv, *fragments) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_recipe(main, argv)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()[-1]  # earlier lines: progress bars of model loading
    assert err.startswith("error: ") and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


@pytest.fixture
def base_and_adapter(tmp_path):
    """A tiny base (3 labels), its pixels and logits, and an adapter saved for it (prompts + classifier)."""
    base = tiny_upernet()
    model = prepare_model(copy.deepcopy(base), "vpt-deep", num_virtual_tokens=3)
    model.save_pretrained(tmp_path / "adapter")
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        logits = base(pixel_values=pixels).logits
    return base, pixels, logits, tmp_path / "adapter"


# --------------------------------------------------------------------------- adapters onto bases
def test_adapter_for_another_num_labels_is_refused_and_the_base_is_untouched(tmp_path, base_and_adapter):
    _, _, _, adapter = base_and_adapter
    torch.manual_seed(1)
    from peft_medseg.models import build_segmentation_model

    other = build_segmentation_model("tiny", 2, image_size=IMAGE_SIZE).eval()
    before, pixels = snapshot(other), torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        logits = other(pixel_values=pixels).logits
    with pytest.raises(ValueError, match=r"num_labels: adapter 3 vs base 2"):
        PeftModel.from_pretrained(other, str(adapter))
    assert_unchanged(other, before, pixels, logits)


def test_weights_that_do_not_fit_roll_the_base_back(tmp_path, base_and_adapter):
    # An adapter from before num_labels was recorded: the classifier copy's shape is the only clue.
    base, pixels, logits, adapter = base_and_adapter
    config = json.loads((adapter / "adapter_config.json").read_text())
    from peft_medseg.models import build_segmentation_model

    torch.manual_seed(1)
    other = build_segmentation_model("tiny", 2, image_size=IMAGE_SIZE).eval()
    config["num_labels"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    before = snapshot(other)
    with torch.no_grad():
        other_logits = other(pixel_values=pixels).logits
    with pytest.raises(ValueError, match=r"do not fit its config.*classifier"):
        PeftModel.from_pretrained(other, str(adapter))
    assert_unchanged(other, before, pixels, other_logits)


def test_absurd_num_virtual_tokens_is_refused_before_any_allocation(tmp_path, base_and_adapter):
    base, pixels, logits, adapter = base_and_adapter
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["num_virtual_tokens"] = 10**9
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"adapter_config\.json.*num_virtual_tokens must be an int in 1\.\.1024"):
        PeftModel.from_pretrained(base, str(adapter))
    assert_unchanged(base, before, pixels, logits)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", r"adapter_config\.json: not valid JSON"),
        ('{"peft_type": "VISUAL_PROMPT", "deep": "x", "layers": "all"}', r"adapter_config\.json.*layers must be"),
    ],
    ids=["invalid_json", "bad_field"],
)
def test_broken_adapter_config_names_the_file(tmp_path, base_and_adapter, text, message):
    base, pixels, logits, adapter = base_and_adapter
    (adapter / "adapter_config.json").write_text(text)
    before = snapshot(base)
    with pytest.raises(ValueError, match=message):
        VisualPromptConfig.from_pretrained(str(adapter))
    with pytest.raises(ValueError, match=message):
        load_finetuned(adapter, _saved_base(tmp_path, base))
    assert_unchanged(base, before, pixels, logits)


def test_a_bad_second_adapter_leaves_the_first_exactly_as_it_was(tmp_path, base_and_adapter):
    base, pixels, _, adapter = base_and_adapter
    model = PeftModel.from_pretrained(base, str(adapter), adapter_name="A").eval()
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
    before = snapshot(model)
    broken = tmp_path / "broken"
    bigger = prepare_model(tiny_upernet(), "vpt-deep", num_virtual_tokens=3)
    bigger.save_pretrained(broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    config["num_virtual_tokens"] = 5  # the weights hold 3 tokens per block
    (broken / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit its config"):
        model.load_adapter(str(broken), adapter_name="B")
    assert sorted(model.peft_config) == ["A"] and model.active_adapter == "A"
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).logits, expected, rtol=0, atol=0)


def test_an_adapter_file_with_tensors_the_model_has_no_place_for_is_refused(tmp_path, base_and_adapter):
    """peft loads non-strictly: a tensor without a place would be dropped and the adapter would compute otherwise.
    Here a depthwise filter of a pyramid-pooling conv, as `vpt-deep-head` adapters held before those convs stopped
    getting one: refused by name, and the adapter loaded before stays exactly as it was."""
    from safetensors.torch import load_file, save_file

    base, pixels, _, adapter = base_and_adapter
    model = PeftModel.from_pretrained(base, str(adapter), adapter_name="A").eval()
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
    head = tmp_path / "head"
    prepare_model(tiny_upernet(), "vpt-deep-head", num_virtual_tokens=3).save_pretrained(head)
    weights = load_file(head / "adapter_model.safetensors")
    stray = "base_model.model.decode_head.psp_modules.0.1.conv.head_update.vpt_depthwise.weight"
    assert stray not in weights
    save_file(weights | {stray: torch.zeros(8, 1, 3, 3)}, head / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"no place for .*psp_modules\.0\.1\.conv\.head_update\.vpt_depthwise"):
        model.load_adapter(str(head), adapter_name="B")
    assert sorted(model.peft_config) == ["A"] and model.active_adapter == "A"
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).logits, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------- base and model folders
@pytest.mark.parametrize("case", ["missing", "empty_folder", "adapter_as_base"])
def test_bad_base_model_paths_name_the_path(tmp_path, base_and_adapter, case):
    _, _, _, adapter = base_and_adapter
    path = {"missing": tmp_path / "nope" / "base", "empty_folder": tmp_path, "adapter_as_base": adapter}[case]
    error = ValueError if case == "adapter_as_base" else FileNotFoundError
    with pytest.raises(error, match=str(path)):
        load_base(path)


def test_a_pickle_base_is_never_unpickled(tmp_path):
    marker = tmp_path / "executed"
    folder = tmp_path / "base"
    tiny_upernet().config.save_pretrained(folder)
    _write_evil_pickle(folder / "pytorch_model.bin", marker)
    with pytest.raises(FileNotFoundError, match=str(folder)):
        load_base(folder)
    assert not marker.exists()


def _write_evil_pickle(path: Path, marker: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path.write_bytes(pickle.dumps(Evil()))


# --------------------------------------------------------------------------- training checkpoints
def _checkpointed_run(data_root: Path, checkpoints: Path, learning_rate=3e-2, method="vpt-deep", resume=None, steps=2):
    data, _ = load_multicenter_dataset(str(data_root))
    processor = build_image_processor(IMAGE_SIZE)
    rows = data["train"].filter(lambda c: c == "A", input_columns="center")
    train, validation = split_validation(rows, 0.25)
    train.set_transform(train_transform(processor, 0))
    validation.set_transform(train_transform(processor, 0))
    model = prepare_model(tiny_upernet(), method, num_virtual_tokens=3)
    config = TrainingConfig(
        learning_rate=learning_rate,
        num_epochs=1,
        batch_size=2,
        checkpoint_dir=str(checkpoints),
        checkpointing_steps=1,
        max_train_steps=steps,
        resume_from_checkpoint=resume,
    )
    return train_segmentation(model, train, validation, NUM_LABELS, config, make_accelerator())


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    data_root = make_folder_dataset(root / "data", centers=("A",), images_per_center=8)
    _checkpointed_run(data_root, root / "checkpoints")
    return data_root, root / "checkpoints"


def test_checkpoints_hold_only_safetensors_and_json(checkpointed):
    _, checkpoints = checkpointed
    files = [p for p in checkpoints.rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} == {".safetensors", ".json"}


@pytest.mark.parametrize("evil_name", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_without_running_it(tmp_path, checkpointed, evil_name):
    data_root, checkpoints = checkpointed
    folder = tmp_path / "step-000002"
    import shutil

    shutil.copytree(checkpoints / "step-000002", folder)
    marker = tmp_path / "executed"
    _write_evil_pickle(folder / evil_name, marker)
    with pytest.raises(ValueError, match=rf"{evil_name}: a pickle-based file"):
        _checkpointed_run(data_root, tmp_path / "new", resume=str(folder))
    assert not marker.exists()


@pytest.mark.parametrize(
    "change, what",
    [({"learning_rate": 1e-3}, "training settings"), ({"method": "vpt-shallow"}, "trained parameters")],
    ids=["settings", "method"],
)
def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, checkpointed, change, what):
    data_root, checkpoints = checkpointed
    with pytest.raises(ValueError, match=rf"step-000002: this checkpoint was written by another run.*{what}"):
        _checkpointed_run(data_root, checkpoints, resume=str(checkpoints / "step-000002"), **change)


# --------------------------------------------------------------------------- data
def test_center_name_that_would_escape_the_output_folder_is_refused(tmp_path):
    victim = tmp_path / "VICTIM"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    rows = {
        "image": [np.zeros((8, 8), np.uint8)] * 4,
        "label": [np.eye(8, dtype=np.uint8)] * 4,
        "center": ["x/../../VICTIM"] * 2 + ["ok"] * 2,
    }
    Dataset.from_dict(rows).save_to_disk(tmp_path / "hf")
    output = tmp_path / "out" / "paper"
    with pytest.raises(DataValidationError, match=r"center name 'x/\.\./\.\./VICTIM' cannot be used in a file name"):
        load_multicenter_dataset(str(tmp_path / "hf"))
    from peft_medseg.experiments.paper import ProtocolConfig, run_protocol

    with pytest.raises(DataValidationError, match="VICTIM"):
        run_protocol(ProtocolConfig(dataset=str(tmp_path / "hf"), held_out=["x/../../VICTIM"]), output)
    assert not output.exists() and folder_state(victim) == {"keep.txt": b"precious"}


@pytest.mark.parametrize("name", ["a/b", "..", "../x", ".hidden", "", "x" * 200, "a\x00b", "c:d"])
def test_unsafe_names(name):
    with pytest.raises(ValueError, match="cannot be used in a file name"):
        check_safe_name(name)


def test_mask_values_outside_the_label_set(tmp_path):
    root = make_folder_dataset(tmp_path / "data", centers=("A",), images_per_center=4)
    for mask in (root / "A" / "masks").iterdir():  # 0/255 masks, as many tools write them
        labels = np.array(Image.open(mask))
        Image.fromarray(np.where(labels > 0, 255, 0).astype(np.uint8)).save(mask)
    with pytest.raises(DataValidationError, match=r"label values \[0, 255\].*--label_map 255=1"):
        load_multicenter_dataset(str(root))
    data, id2label = load_multicenter_dataset(str(root), label_map=parse_label_map(["255=1"]))
    assert len(id2label) == 2 and set(np.unique(np.asarray(data["train"][0]["label"]))) <= {0, 1}
    # A 4-class base on this (2-class) data would score two classes that never occur.
    with pytest.raises(DataValidationError, match=r"label values \[0, 1\], expected each of 0\.\.3 \(the model has 4"):
        load_multicenter_dataset(str(root), num_labels=4, label_map={255: 1})
    with pytest.raises(ValueError, match="--label_map entry '255:1'"):
        parse_label_map(["255:1"])


class Oracle(torch.nn.Module):
    """Predicts class 1 wherever the first channel is positive; says it has `num_labels` classes."""

    def __init__(self, num_labels):
        super().__init__()
        self.config = type("Config", (), {"num_labels": num_labels})()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, pixel_values):
        logits = torch.zeros(pixel_values.shape[0], self.config.num_labels, *pixel_values.shape[2:])
        logits[:, 1] = pixel_values[:, 0]
        return type("Output", (), {"logits": logits})()


def test_scores_leave_out_absent_classes_and_refuse_foreign_labels():
    reference = torch.zeros(16, 16, dtype=torch.long)
    reference[4:8, 4:8] = 1
    wrong = torch.full((3, 16, 16), -1.0)
    wrong[:, 10:14, 10:14] = 1.0  # predicts the lesion in the wrong place: lesion Dice 0
    rows = [{"pixel_values": wrong, "labels": reference, "center": "A", "id": "a0"}]
    scores = evaluate_segmentation(Oracle(4), rows, 4)
    # Classes 2 and 3 occur nowhere: averaged in as 1s they would report Dice 0.667 for a lesion Dice of 0.
    assert scores["A"]["dice"] == 0.0 and scores["A"]["absent_classes"] == [2, 3]
    assert "A: [2, 3]" in absent_classes_note(scores)
    with pytest.raises(ValueError, match=r"the model predicts 4 classes, but the scores were asked for 2"):
        evaluate_segmentation(Oracle(4), rows, 2)
    rows[0]["labels"] = reference * 3
    with pytest.raises(ValueError, match=r"center 'A', sample 'a0': reference label 3 outside 0\.\.1"):
        evaluate_segmentation(Oracle(2), rows, 2)


def _write_manifest(root: Path, lines: list[str]) -> None:
    (root / "manifest.csv").write_text("center,id,split\n" + "\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "lines, message",
    [
        (["A,000,train", "A,001,tset"], r"manifest\.csv, line 3: split 'tset' for id '001'"),
        (["A,000,train", "A,000,test"], r"manifest\.csv, lines 2 and 3: id '000' of center 'A' is listed twice"),
    ],
    ids=["unknown_split", "duplicate_id"],
)
def test_manifest_slips(tmp_path, lines, message):
    root = make_folder_dataset(tmp_path / "data", centers=("A",), images_per_center=2)
    _write_manifest(root, lines)
    with pytest.raises(DataValidationError, match=message):
        load_folder_dataset(root)


def test_two_images_for_one_id_and_a_truncated_jpeg(tmp_path):
    root = make_folder_dataset(tmp_path / "data", centers=("A",), images_per_center=2)
    image = Image.open(root / "A" / "images" / "000.png")
    image.save(root / "A" / "images" / "000.jpg")
    with pytest.raises(DataValidationError, match=r"000\.jpg and .*000\.png: two images for id '000'"):
        load_folder_dataset(root)
    (root / "A" / "images" / "000.png").unlink()
    jpeg = root / "A" / "images" / "000.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    with pytest.raises(DataValidationError, match=r"000\.jpg: unreadable image file"):
        load_folder_dataset(root)


def test_nifti_label_on_another_grid(tmp_path):
    nibabel = pytest.importorskip("nibabel")
    (tmp_path / "c" / "images").mkdir(parents=True)
    (tmp_path / "c" / "labels").mkdir(parents=True)
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    nibabel.save(nibabel.Nifti1Image(np.zeros((4, 4, 2), np.float32), affine), tmp_path / "c/images/p1.nii.gz")
    nibabel.save(nibabel.Nifti1Image(np.zeros((4, 4, 2), np.uint8), np.eye(4)), tmp_path / "c/labels/p1.nii.gz")
    with pytest.raises(DataValidationError, match=r"labels/p1\.nii\.gz: affine differs from its image's"):
        load_nifti_dataset(tmp_path)


# --------------------------------------------------------------------------- output folders
def test_output_folder_taken_by_another_run(tmp_path):
    target = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from peft_medseg.storage import claim_output_dir
            with claim_output_dir({str(target)!r}):
                print("claimed", flush=True)
                time.sleep(30)
        """)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(OutputDirError, match=rf"{target}: another run \(pid {holder.pid}\) is writing"):
            with claim_output_dir(target):
                pass
    finally:
        holder.kill()
        holder.wait()
    with claim_output_dir(target):  # the kernel released the dead run's claim
        pass


def test_read_only_output_parent(tmp_path):
    if os.geteuid() == 0:  # root writes into any folder of an ordinary file system: use one that refuses root too
        parent = Path("/sys")
        if not parent.is_dir() or os.access(parent, os.W_OK) and (parent / "peft_medseg_probe").exists():
            pytest.skip("no read-only file system to write into")
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o500)
    with pytest.raises(OutputDirError, match=rf"{parent}: cannot write the output folder here"):
        with claim_output_dir(parent / "peft_medseg_out"):
            pass
    assert not (parent / "peft_medseg_out").exists()


def test_output_path_that_is_a_file_and_a_full_disk(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="exists and is not a folder"):
        with claim_output_dir(tmp_path / "file"):
            pass
    with pytest.raises(OutputDirError, match=r"MiB free, fewer than"):
        with claim_output_dir(tmp_path / "out", min_free_bytes=1 << 60):
            pass


# --------------------------------------------------------------------------- recipes
@pytest.fixture(scope="module")
def small_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data_root = make_folder_dataset(root / "data", centers=("A", "B"), images_per_center=6)
    base = tiny_upernet()
    base.save_pretrained(root / "base")
    build_image_processor(IMAGE_SIZE).save_pretrained(root / "base")
    return root, data_root


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--eval_centers", "A"], ["--eval_centers ['A'] leaves out the new center 'B'"]),
        (["--eval_centers", "A", "B", "Z"], ["--eval_centers ['Z']: no test rows"]),
        (["--new_center", "Z"], ["--new_center 'Z'"]),
        (["--label_map", "1:2"], ["--label_map entry '1:2'"]),
    ],
    ids=["eval_centers_without_new", "unknown_eval_center", "unknown_new_center", "bad_label_map"],
)
def test_finetune_refuses_bad_arguments_before_training(capsys, small_pipeline, extra, fragments):
    root, data_root = small_pipeline
    output = root / "never"
    argv = ["--base_model", str(root / "base"), "--dataset", str(data_root), "--new_center", "B"]
    argv += ["--num_epochs", "1", "--output_dir", str(output), *extra]
    fails_with_one_line(capsys, recipe("finetune_center").main, argv, *fragments)
    assert not output.exists() and not Path(f"{output}-checkpoints").exists()


def test_finetune_base_model_errors_and_debug_traceback(capsys, small_pipeline, tmp_path):
    root, data_root = small_pipeline
    main = recipe("finetune_center").main
    common = ["--dataset", str(data_root), "--new_center", "B", "--output_dir", str(tmp_path / "o")]
    fails_with_one_line(capsys, main, ["--base_model", str(tmp_path), *common], f"{tmp_path}: not a model folder")
    fails_with_one_line(capsys, main, ["--base_model", "./no/such/base", *common], "./no/such/base: no such model")
    with pytest.raises(FileNotFoundError):
        run_recipe(main, ["--base_model", "./no/such/base", *common, "--debug"])


def test_an_existing_adapter_survives_a_failed_run(capsys, small_pipeline, base_and_adapter, tmp_path):
    root, data_root = small_pipeline
    _, _, _, adapter = base_and_adapter
    before = folder_state(adapter)
    argv = ["--base_model", str(root / "base"), "--dataset", str(data_root), "--new_center", "B"]
    argv += ["--eval_centers", "A", "--output_dir", str(adapter)]
    fails_with_one_line(capsys, recipe("finetune_center").main, argv, "leaves out the new center")
    assert folder_state(adapter) == before


# --------------------------------------------------------------------------- killed saves
SAVE_LOOP = """
import sys, torch, peft_medseg
from peft_medseg.storage import save_finetuned
from peft_medseg.training import prepare_model
sys.path.insert(0, {tests!r})
from test_training import tiny_base
models = []
for seed in (1, 2):
    torch.manual_seed(seed)
    models.append(prepare_model(tiny_base(), "vpt-deep", num_virtual_tokens=3))
print("ready", flush=True)
i = 0
while True:
    save_finetuned(models[i % 2], {target!r}, evaluation={{"round": i}})
    i += 1
"""


def test_sigkill_at_random_points_of_a_save_loop_leaves_a_loadable_adapter(tmp_path):
    target = tmp_path / "adapter"
    base = tiny_upernet()
    save_finetuned(prepare_model(copy.deepcopy(base), "vpt-deep", num_virtual_tokens=3), target)
    script = SAVE_LOOP.format(tests=str(REPO / "tests"), target=str(target))
    rng = random.Random(0)
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    for _ in range(6):
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        process.send_signal(signal.SIGKILL)
        process.wait()
        model = load_finetuned(target, _saved_base(tmp_path, base))
        with torch.no_grad():
            assert torch.isfinite(model(pixel_values=pixels).logits).all()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".adapter.")]
    with atomic_directory(target) as staging:  # the next write cleans up after the killed ones
        for name in os.listdir(target):
            (staging / name).write_bytes((target / name).read_bytes())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter.")], leftovers


def _saved_base(tmp_path: Path, base) -> Path:
    folder = tmp_path / "base"
    if not folder.is_dir():
        base.save_pretrained(folder)
        build_image_processor(IMAGE_SIZE).save_pretrained(folder)
    return folder


def test_a_kill_between_the_two_renames_is_repaired_on_load(tmp_path):
    # Where the system cannot swap two folders in one step, the old folder waits in `.<name>.old-<pid>-*` between
    # two renames; a kill there leaves no adapter at the target. The next load puts it back.
    base = tiny_upernet()
    target = tmp_path / "adapter"
    save_finetuned(prepare_model(copy.deepcopy(base), "vpt-deep", num_virtual_tokens=3), target)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f".adapter.old-{int(dead.stdout)}-x"
    aside.mkdir()
    os.rename(target, aside / "adapter")
    model = load_finetuned(target, _saved_base(tmp_path, base))
    assert isinstance(model, PeftModel) and target.is_dir() and not aside.exists()


def test_a_checkpoint_killed_between_the_two_renames_is_found_again(tmp_path, checkpointed):
    import shutil

    from peft_medseg.training import latest_checkpoint

    _, checkpoints = checkpointed
    folder = tmp_path / "checkpoints"
    shutil.copytree(checkpoints, folder)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = folder / f".step-000002.old-{int(dead.stdout)}-x"
    aside.mkdir()
    os.rename(folder / "step-000002", aside / "step-000002")
    assert latest_checkpoint(folder) == folder / "step-000002" and not aside.exists()
