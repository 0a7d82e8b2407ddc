"""The recipes as a user runs them: --help, pretrain -> finetune -> evaluate, a real kill and resume, and torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import IMAGE_SIZE, make_folder_dataset

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([*map(str, args)], capture_output=True, text=True, env=ENV, cwd=REPO, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.mark.parametrize(
    "recipe, options",
    [
        ("pretrain_base.py", ["--base", "--centers", "--mixed_precision", "--resume_from_checkpoint"]),
        ("finetune_center.py", ["--method", "vpt-shallow", "--num_train_cases", "--gradient_accumulation_steps"]),
        ("evaluate_centers.py", ["--base_model", "--models", "--num_overlays"]),
    ],
)
def test_help(recipe, options):
    text = run(sys.executable, RECIPES / recipe, "--help").stdout
    assert all(option in text for option in options)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A folder dataset and a base pretrained by the recipe on centers A and B (two steps)."""
    root = tmp_path_factory.mktemp("recipes")
    data = make_folder_dataset(root / "data", images_per_center=12)
    run(
        sys.executable, RECIPES / "pretrain_base.py", "--dataset", data, "--centers", "A", "B",
        "--image_size", IMAGE_SIZE, "--num_epochs", 1, "--max_train_steps", 2, "--batch_size", 4,
        "--output_dir", root / "base",
    )  # fmt: skip
    return root, data


def finetune(pipeline, output, *extra, check=True, popen=False):
    root, data = pipeline
    args = [
        sys.executable, RECIPES / "finetune_center.py", "--dataset", data, "--base_model", root / "base",
        "--new_center", "C", "--output_dir", output, *extra,
    ]  # fmt: skip
    if popen:
        return subprocess.Popen(
            list(map(str, args)), env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    return run(*args, check=check)


def test_pretrain_finetune_evaluate(pipeline):
    root, data = pipeline
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {
        p.name for p in (root / "base").iterdir()
    }
    finetune(
        pipeline,
        root / "vpt",
        "--method",
        "vpt-deep",
        "--num_virtual_tokens",
        2,
        "--max_train_steps",
        2,
        "--num_epochs",
        1,
    )
    finetune(
        pipeline,
        root / "full",
        "--method",
        "full",
        "--max_train_steps",
        2,
        "--num_epochs",
        1,
        "--mixed_precision",
        "bf16",
    )

    from peft_medseg.hub import read_evaluation

    evaluation = read_evaluation(root / "vpt" / "evaluation.json")  # the hub helper's validator accepts it
    assert evaluation["center"] == "C" and evaluation["method"] == "vpt-deep"
    assert set(evaluation["metrics"]) == {"A", "B", "C"} and evaluation["train"]["num_virtual_tokens"] == 2
    assert 0 < evaluation["trainable_parameters"] < evaluation["total_parameters"]

    from peft import PeftModel
    from transformers import AutoModelForSemanticSegmentation

    import peft_medseg  # noqa: F401

    base = AutoModelForSemanticSegmentation.from_pretrained(root / "base")
    PeftModel.from_pretrained(base, str(root / "vpt"))
    AutoModelForSemanticSegmentation.from_pretrained(root / "full")
    # The adapter travels with its center's signature, made with this base; a full model has no router to feed.
    from peft_medseg.routing import SIGNATURE_FILENAME, CenterRouter

    CenterRouter.from_adapters([root / "vpt"]).check_base(
        AutoModelForSemanticSegmentation.from_pretrained(root / "base")
    )
    assert not (root / "full" / SIGNATURE_FILENAME).exists()

    out = root / "eval"
    result = run(
        sys.executable, RECIPES / "evaluate_centers.py", "--dataset", data, "--base_model", root / "base",
        "--models", root / "vpt", root / "full", "--output_dir", out,
    )  # fmt: skip
    assert "C: direct inference Dice" in result.stdout and "| routed |" in result.stdout
    for name in ("matrix.md", "matrix.csv", "matrix.json", "dice_heatmap.png", "overlays.png"):
        assert (out / name).stat().st_size > 0
    matrix = json.loads((out / "matrix.json").read_text())
    assert [row["name"] for row in matrix["rows"]] == ["base", "vpt-deep:C", "full:C", "routed"]


def _trainable(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.slow
def test_killed_mid_epoch_then_resumed_equals_uninterrupted(pipeline):
    root, _ = pipeline
    common = ["--method", "vpt-deep", "--num_virtual_tokens", 2, "--num_epochs", 3, "--batch_size", 2]
    finetune(pipeline, root / "straight", *common)
    killed = root / "killed"
    process = finetune(pipeline, killed, *common, "--checkpointing_steps", 1, popen=True)
    checkpoints = Path(f"{killed}-checkpoints")
    deadline = time.time() + 60
    while not (checkpoints / "step-000004").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not killed.exists(), "the run must die before it finishes"
    finetune(pipeline, killed, *common, "--checkpointing_steps", 1, "--resume_from_checkpoint", "latest")
    expected, resumed = _trainable(root / "straight"), _trainable(killed)
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0)


DP_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
from peft_medseg.models import build_image_processor, build_segmentation_model
from peft_medseg.training import *
data, _ = load_multicenter_dataset(sys.argv[1])
processor = build_image_processor({size})
rows = data["train"].filter(lambda c: c == "A", input_columns="center")
train, validation = rows.select(range(8)), rows.select(range(8, len(rows)))
train.set_transform(train_transform(processor, 0)); validation.set_transform(eval_transform(processor))
torch.manual_seed(0)
model = prepare_model(build_segmentation_model("tiny", 3, image_size={size}), "vpt-deep", num_virtual_tokens=2,
                      prompt_dropout=0.0)
accelerator = make_accelerator()
config = TrainingConfig(learning_rate=3e-2, num_epochs=2, batch_size=int(sys.argv[2]))
train_segmentation(model, train, validation, 3, config, accelerator)
state = {{n: p.detach().contiguous() for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}}
save_file(state, f"{{sys.argv[3]}}/rank{{accelerator.process_index}}-of-{{accelerator.num_processes}}.safetensors")
if accelerator.is_main_process:  # one writer: two ranks printing at once interleave their lines
    print(accelerator.distributed_type, accelerator.num_processes)
"""


@pytest.mark.slow
def test_data_parallel_two_cpu_processes_match_one_process_with_the_doubled_batch(pipeline, tmp_path):
    _, data = pipeline
    script = tmp_path / "dp.py"
    script.write_text(DP_SCRIPT.format(size=IMAGE_SIZE))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port", free_port()]
    result = run(*torchrun, script, data, 2, tmp_path, timeout=120)
    assert "MULTI_CPU 2" in result.stdout
    run(sys.executable, script, data, 4, tmp_path, timeout=120)
    rank0, rank1 = load_file(tmp_path / "rank0-of-2.safetensors"), load_file(tmp_path / "rank1-of-2.safetensors")
    single = load_file(tmp_path / "rank0-of-1.safetensors")
    initial = prepare_initial_prompts()
    for key in rank0:
        torch.testing.assert_close(rank1[key], rank0[key], rtol=0, atol=0)  # DDP keeps the ranks identical
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(rank0[k], initial[k]) for k in initial), "training must have moved the prompts"


def free_port() -> int:
    # A fixed port collides with any other torchrun on the machine (parallel test runs, other sessions).
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prepare_initial_prompts() -> dict[str, torch.Tensor]:
    from peft_medseg.models import build_segmentation_model
    from peft_medseg.training import prepare_model

    torch.manual_seed(0)
    model = prepare_model(build_segmentation_model("tiny", 3, image_size=IMAGE_SIZE), "vpt-deep", num_virtual_tokens=2)
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
