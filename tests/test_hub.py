"""Center adapters on the Hub: evaluation JSON, card, folder checks, dry run, push/pull round trip, offline pull.

The round trip runs the real `huggingface_hub` client in subprocesses (it reads HF_ENDPOINT and HF_HUB_OFFLINE at
import) against `tests/local_hub.py`, an in-memory Hub-compatible server on 127.0.0.1. Nothing leaves the machine and
every Hugging Face cache lives in tmp_path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as T
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from local_hub import LocalHub, Repo  # tests/ is on sys.path under pytest's default import mode
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSemanticSegmentation

import peft_medseg
from peft_medseg.hub import (
    prepare_upload_folder,
    read_evaluation,
    render_adapter_card,
    validate_card_metadata,
    validate_evaluation,
)
from peft_medseg.hub import push as push_module
from peft_medseg.models import build_segmentation_model
from peft_medseg.visual_prompt import check_adapter_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_local_test_token"
UPLOADED = ["README.md", "adapter_config.json", "adapter_model.safetensors", "evaluation.json"]

EVALUATION = {
    "center": "B",
    "method": "vpt-deep",
    "dataset": "org/headneck-ct",
    "trainable_parameters": 1219,
    "total_parameters": 250000,
    "metrics": {
        "A": {"dice": 0.71, "hd95": 6.5},
        "B": {"dice": 0.84, "hd95": 3.25},
        "C": {"dice": 0.66, "hd95": None},
    },
    "train": {"num_train_cases": 12, "epochs": 3, "learning_rate": 0.001, "seed": 0},
}


def _saved_adapter(root: Path, base: torch.nn.Module, config: peft_medseg.VisualPromptConfig) -> dict[str, Path]:
    """`base` saved to disk (so every process loads identical weights), an adapter on it, its eval JSON."""
    torch.manual_seed(0)
    base.save_pretrained(root / "base")
    base = AutoModelForSemanticSegmentation.from_pretrained(root / "base")
    model = get_peft_model(base, config)
    with torch.no_grad():  # trained-looking prompts: a random-init adapter could hide a failed load
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    model.save_pretrained(root / "center-B")
    (root / "eval.json").write_text(json.dumps(EVALUATION))
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(pixel_values, root / "pixel_values.pt")
    model.eval()
    with torch.no_grad():
        torch.save(model(pixel_values=pixel_values).logits, root / "expected_logits.pt")
    return {"root": root, "base": root / "base", "adapter": root / "center-B", "eval": root / "eval.json"}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> dict[str, Path]:
    """A deep VPT adapter (token prompts) on a tiny DINOv2 + UperNet base."""
    torch.manual_seed(0)
    base = build_segmentation_model("tiny", num_labels=3, image_size=32)
    config = peft_medseg.VisualPromptConfig(num_virtual_tokens=4, modules_to_save=["decode_head.classifier"])
    return _saved_adapter(tmp_path_factory.mktemp("adapter"), base, config)


KEY_VALUE_BASES = {
    # Every stage its own width: key/value prompts are (num_virtual_tokens, stage width), not one hidden size.
    "segformer": lambda: T.SegformerForSemanticSegmentation(
        T.SegformerConfig(num_labels=3, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], decoder_hidden_size=16)
    ),
    "swin": lambda: T.UperNetForSemanticSegmentation(
        T.UperNetConfig(
            backbone_config=T.SwinConfig(
                embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], image_size=32, out_features=STAGES
            ),
            hidden_size=16,
            use_auxiliary_head=False,
            num_labels=3,
        )
    ),
}
STAGES = ["stage1", "stage2", "stage3", "stage4"]


@pytest.fixture(scope="module", params=sorted(KEY_VALUE_BASES))
def kv_adapter(request, tmp_path_factory) -> dict[str, Path]:
    """A key/value prompt adapter on a tiny SegFormer or Swin base (the widths differ from stage to stage)."""
    torch.manual_seed(0)
    base = KEY_VALUE_BASES[request.param]()
    config = peft_medseg.VisualPromptConfig(num_virtual_tokens=3, prompt_mode="key_value")
    return _saved_adapter(tmp_path_factory.mktemp(f"kv-{request.param}"), base, config)


# ---- evaluation JSON ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, field",
    [
        ({"center": ""}, "center"),
        ({"metrics": {}}, "metrics"),
        ({"metrics": {"A": {"dice": 1.7}}}, "metrics.A.dice"),
        ({"metrics": {"A": {"dice": 0.5, "hd95": "far"}}}, "metrics.A.hd95"),
        ({"trainable_parameters": -3}, "trainable_parameters"),
        ({"train": [1, 2]}, "train"),
    ],
)
def test_evaluation_errors_name_file_and_field(tmp_path, change, field):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({**EVALUATION, **change}))
    with pytest.raises(ValueError) as error:
        read_evaluation(path)
    assert str(path) in str(error.value) and f"'{field}'" in str(error.value)


def test_evaluation_tolerates_missing_optional_parts_and_undefined_hd95(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text('{"center": "B", "metrics": {"B": {"dice": 0.8, "hd95": Infinity}, "A": {"dice": 0.5}}}')
    evaluation = read_evaluation(path)
    assert evaluation["metrics"] == {"B": {"dice": 0.8, "hd95": None}, "A": {"dice": 0.5, "hd95": None}}
    assert evaluation["train"] == {} and evaluation["dataset"] is None
    with pytest.raises(ValueError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        read_evaluation(tmp_path / "bad.json")


# ---- card -----------------------------------------------------------------------------------------------------------


def test_card_renders_with_metadata_that_huggingface_hub_parses(adapter):
    check = check_adapter_folder(adapter["adapter"])
    card = render_adapter_card(
        check.config,
        validate_evaluation(EVALUATION),
        repo_id="org/center-B",
        base_model="org/tiny-base",
        trainable_parameters=check.trainable_parameters,
        adapter_bytes=check.adapter_bytes,
    )
    data = validate_card_metadata(card)
    assert data.library_name == "peft" and data.base_model == "org/tiny-base" and data.license == "apache-2.0"
    assert {"medical-image-segmentation", "visual-prompt-tuning", "center-B"} <= set(data.tags)
    assert data.datasets == ["org/headneck-ct"]

    # model-index, parsed back by huggingface_hub from the README text: Dice per test center, HD95 where defined.
    reparsed = ModelCard(str(card))
    name, results = model_index_to_eval_results(reparsed.data.to_dict()["model-index"])
    assert name == "org/center-B"
    scores = {(r.dataset_config, r.metric_type): r.metric_value for r in results}
    assert scores == {
        ("A", "dice"): 0.71,
        ("A", "hd95"): 6.5,
        ("B", "dice"): 0.84,
        ("B", "hd95"): 3.25,
        ("C", "dice"): 0.66,
    }

    text = card.text
    for needle in (
        "import peft_medseg",
        'PeftModel.from_pretrained(base, "org/center-B")',
        "Research use only",
        "clinical decisions",
        "| **B** | **0.8400** | **3.25** |",
        "| C | 0.6600 | n/a |",
        f"{check.trainable_parameters:,}",
        check.config["base_fingerprint"],
        "Num train cases: 12",
        "saeed2023prompt",
        "jia2022visual",
    ):
        assert needle in text, needle
    # A local base path is not a Hub id: it stays out of the metadata (the Hub would link it) but is shown in the text.
    local_card = render_adapter_card(check.config, None, repo_id="org/center-B")
    assert validate_card_metadata(local_card).base_model is None
    assert str(adapter["base"]) in local_card.text and "No evaluation was provided" in local_card.text


def test_card_metadata_validation_rejects_broken_metadata(adapter):
    card = str(render_adapter_card(json.loads((adapter["adapter"] / "adapter_config.json").read_text()), EVALUATION))
    with pytest.raises(ValueError, match="model_index"):
        validate_card_metadata(card.replace("      value: 0.84\n", "", 1))  # a metric without its value
    with pytest.raises(ValueError, match="library_name"):
        validate_card_metadata(card.replace("library_name: peft", "library_name: timm"))
    with pytest.raises(ValueError, match="visual-prompt-tuning"):
        validate_card_metadata(card.replace("- visual-prompt-tuning\n", ""))


def test_card_describes_the_default_methods_head_and_mlp_updates(adapter):
    config = json.loads((adapter["adapter"] / "adapter_config.json").read_text())
    plain = render_adapter_card(config, None).text
    assert "Head update" not in plain and "MLP update" not in plain
    card = render_adapter_card({**config, "head_rank": 2, "head_depthwise": True, "mlp_rank": 1}, None).text
    assert (
        "- Head update: a rank-2 1x1 update of every decode-head convolution, per center, each with a depthwise"
        in card
    )
    assert "- MLP update: a rank-1 update of the MLP output projection of every prompted block, per center" in card


# ---- adapter folder checks and dry run ------------------------------------------------------------------------------


def _copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_check_adapter_folder_rejects_weights_that_do_not_fit_the_stated_base(adapter, tmp_path):
    check = check_adapter_folder(adapter["adapter"])
    assert check.num_prompt_tensors == 4  # deep VPT on the 4 blocks of the tiny base
    assert check.trainable_parameters == 4 * 4 * 64 + 3 * 64 + 3  # prompts + saved decode_head.classifier

    wrong_width = _copy_adapter(adapter["adapter"], tmp_path / "wrong-width")
    config = json.loads((wrong_width / "adapter_config.json").read_text())
    (wrong_width / "adapter_config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: tensor '.*vpt_prompt' has shape \(4, 64\)"):
        check_adapter_folder(wrong_width)

    missing_block = _copy_adapter(adapter["adapter"], tmp_path / "missing-block")
    weights = load_file(missing_block / "adapter_model.safetensors")
    del weights[next(key for key in sorted(weights) if "vpt_prompt" in key)]
    save_file(weights, missing_block / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="holds 3 prompt tensor"):
        check_adapter_folder(missing_block)

    not_vpt = _copy_adapter(adapter["adapter"], tmp_path / "not-vpt")
    (not_vpt / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    with pytest.raises(
        ValueError, match=r"adapter_config\.json: field 'peft_type' must be 'VISUAL_PROMPT', got 'LORA'"
    ):
        check_adapter_folder(not_vpt)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        check_adapter_folder(tmp_path)


def test_dry_run_writes_the_upload_folder_atomically(adapter, tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO_ROOT / "recipes"))
    try:
        import push_adapter
    finally:
        sys.path.remove(str(REPO_ROOT / "recipes"))
    out = tmp_path / "upload"
    args = [
        "--adapter_dir",
        str(adapter["adapter"]),
        "--repo-id",
        "org/center-B",
        "--evaluation",
        str(adapter["eval"]),
    ]
    assert push_adapter.main([*args, "--dry-run", "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == UPLOADED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upload"]  # no temporary folder left behind
    assert (out / "adapter_model.safetensors").read_bytes() == (
        adapter["adapter"] / "adapter_model.safetensors"
    ).read_bytes()
    assert (out / "evaluation.json").read_bytes() == adapter["eval"].read_bytes()
    validate_card_metadata((out / "README.md").read_text())
    with pytest.raises(FileExistsError, match="already exists"):
        push_adapter.main([*args, "--dry-run", "--output-dir", str(out)])

    # A failure half-way leaves neither a partial folder at the destination nor a stray temporary one.
    real_copyfile, calls = push_module.shutil.copyfile, []

    def copy_then_fail(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_copyfile(src, dst)

    monkeypatch.setattr(push_module.shutil, "copyfile", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        prepare_upload_folder(adapter["adapter"], tmp_path / "second", evaluation_path=adapter["eval"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upload"]

    # Bad input is refused before anything is written, naming file and field.
    bad_eval = tmp_path / "bad-eval.json"
    bad_eval.write_text(json.dumps({**EVALUATION, "metrics": {"A": {"dice": "high"}}}))
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"bad-eval\.json: field 'metrics\.A\.dice'"):
        prepare_upload_folder(adapter["adapter"], tmp_path / "third", evaluation_path=bad_eval)
    assert not (tmp_path / "third").exists()


# ---- push and pull through the real huggingface_hub client ------------------------------------------------------------


def _client_env(hub: LocalHub | None, hf_home: Path, offline: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]),
        HF_HOME=str(hf_home),
        HF_HUB_OFFLINE="1" if offline else "0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_IMPLICIT_TOKEN="0",
    )
    if hub is not None:
        env.update(HF_ENDPOINT=hub.endpoint, HF_TOKEN=hub.token)
    else:
        env.update(HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens there: offline must mean offline
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> str:
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{args[:3]} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


ONLINE_CLIENT = textwrap.dedent(
    """
    import runpy, sys, torch
    import peft_medseg  # registers VISUAL_PROMPT, without which peft cannot read the adapter config
    from peft import PeftModel
    from peft_medseg.hub import push_adapter_to_hub
    from transformers import AutoModelForSemanticSegmentation

    recipe, adapter_dir, evaluation, base_dir, pixel_values, out = sys.argv[1:7]

    # 1. The recipe, as a script, pushes to a new private repo.
    sys.argv = [recipe, "--adapter_dir", adapter_dir, "--repo-id", "org/center-B", "--evaluation", evaluation, "--private"]
    try:
        runpy.run_path(recipe, run_name="__main__")
    except SystemExit as exit:
        assert exit.code == 0, exit.code

    # 2. Open-as-PR, a branch push, and --private refusing a repo that already exists as public.
    pr = push_adapter_to_hub(adapter_dir, "org/center-B", evaluation_path=evaluation, create_pr=True)
    print("PR", pr.pr_url, pr.pr_revision)
    push_adapter_to_hub(adapter_dir, "org/center-B", revision="v2", commit_message="v2 of center B")
    try:
        push_adapter_to_hub(adapter_dir, "org/public-one", private=True)
    except ValueError as error:
        print("REFUSED", error)

    # 3. Pull by repo id with peft (a private repo: the token comes from HF_TOKEN); this fills the HF cache.
    base = AutoModelForSemanticSegmentation.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, "org/center-B").eval()
    with torch.no_grad():
        torch.save(model(pixel_values=torch.load(pixel_values)).logits, out)
    """
)

OFFLINE_CLIENT = textwrap.dedent(
    """
    import sys, torch
    import peft_medseg
    from peft import PeftModel
    from transformers import AutoModelForSemanticSegmentation as Auto

    base_dir, pixel_values, out = sys.argv[1:4]
    model = PeftModel.from_pretrained(Auto.from_pretrained(base_dir), "org/center-B").eval()
    with torch.no_grad():
        torch.save(model(pixel_values=torch.load(pixel_values)).logits, out)
    # A repo the cache never saw must fail, not load something else.
    try:
        PeftModel.from_pretrained(Auto.from_pretrained(base_dir), "org/center-Z")
    except Exception as error:
        print("NOT CACHED", type(error).__name__)
    """
)


@pytest.mark.slow
def test_push_and_pull_round_trip_through_huggingface_hub(adapter, tmp_path):
    round_trip(adapter, tmp_path)


@pytest.mark.slow
def test_key_value_adapters_pass_the_dry_run_and_the_round_trip(kv_adapter, tmp_path):
    check = check_adapter_folder(kv_adapter["adapter"])
    widths = {
        load_file(kv_adapter["adapter"] / "adapter_model.safetensors")[k].shape[1] for k in _prompt_keys(kv_adapter)
    }
    assert check.num_prompt_tensors == 4 and len(widths) > 1  # one set per block, at each stage's width
    round_trip(kv_adapter, tmp_path)


def _prompt_keys(adapter: dict[str, Path]) -> list[str]:
    return [k for k in load_file(adapter["adapter"] / "adapter_model.safetensors") if "vpt_prompt" in k]


def round_trip(adapter: dict[str, Path], tmp_path: Path) -> None:
    """Dry run, push, PR, branch, refusal, online pull and offline pull of `adapter` through the real client."""
    root, expected = adapter["root"], torch.load(adapter["root"] / "expected_logits.pt")
    dry_run = tmp_path / "dry-run"
    prepare_upload_folder(adapter["adapter"], dry_run, repo_id="org/center-B", evaluation_path=adapter["eval"])
    pixel_values = str(root / "pixel_values.pt")

    with LocalHub(token=TOKEN) as hub:
        hub.repos["org/public-one"] = Repo(repo_id="org/public-one", private=False)
        hub.repos["org/public-one"].commit("main", {}, set(), "initial commit")
        recipe = str(REPO_ROOT / "recipes" / "push_adapter.py")
        client = [recipe, str(adapter["adapter"]), str(adapter["eval"]), str(adapter["base"]), pixel_values]
        output = _run(
            [sys.executable, "-c", ONLINE_CLIENT, *client, str(tmp_path / "online.pt")],
            _client_env(hub, tmp_path / "hf-home", offline=False),
            tmp_path,
        )
        assert hub.unhandled == []  # the client needed no route the local Hub lacks

    # 1. The recipe's push: a private repo holding exactly what --dry-run wrote (plus the Hub's .gitattributes).
    repo = hub.repos["org/center-B"]
    assert repo.private
    first_commit = repo.commits[repo.refs["main"]]  # later pushes went to a PR and a branch, never to main
    assert first_commit.message == "Upload visual prompt adapter for center B"
    assert sorted(first_commit.files) == [".gitattributes", *UPLOADED]
    for name in UPLOADED:
        assert first_commit.files[name] == (dry_run / name).read_bytes(), name
    assert ("POST", "/api/models/org/center-B/preupload/main") in hub.requests

    # 2. The PR branches off main without touching it; the branch push lands on v2; the public repo got nothing.
    assert f"PR {hub.endpoint}/org/center-B/discussions/1 refs/pr/1" in output
    assert repo.commits[repo.refs["refs/pr/1"]].parent == repo.refs["main"] == first_commit.oid
    assert hub.files("org/center-B", "refs/pr/1")["README.md"] == first_commit.files["README.md"]
    assert repo.commits[repo.refs["v2"]].message == "v2 of center B"
    assert "adapter_model.safetensors" in hub.files("org/center-B", "v2")
    assert "REFUSED org/public-one already exists and is public" in output
    assert "adapter_model.safetensors" not in hub.files("org/public-one")

    # 3. The online pull downloaded the adapter from the local Hub and reproduces the original logits exactly.
    assert ("GET", "/org/center-B/resolve/main/adapter_model.safetensors") in hub.requests
    torch.testing.assert_close(torch.load(tmp_path / "online.pt"), expected, rtol=0, atol=0)

    # 4. Server gone, HF_HUB_OFFLINE=1, fresh process: the same repo id loads from the cache, identically.
    output = _run(
        [sys.executable, "-c", OFFLINE_CLIENT, str(adapter["base"]), pixel_values, str(tmp_path / "offline.pt")],
        _client_env(None, tmp_path / "hf-home", offline=True),
        tmp_path,
    )
    torch.testing.assert_close(torch.load(tmp_path / "offline.pt"), expected, rtol=0, atol=0)
    assert "NOT CACHED" in output


def test_upload_carries_the_center_signature_for_routing(adapter, tmp_path):
    """An adapter saved by finetune_center.py has its signature next to it; the upload takes it along, checked."""
    import shutil

    from peft_medseg.routing import SIGNATURE_FILENAME, CenterSignature, compute_signature

    folder = tmp_path / "center-B"
    shutil.copytree(adapter["adapter"], folder)
    base = AutoModelForSemanticSegmentation.from_pretrained(adapter["adapter"].parent / "base").eval()
    images = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    compute_signature(base, "B", images[:2], images[2:]).save(folder)
    prepare_upload_folder(folder, tmp_path / "upload")
    assert sorted(p.name for p in (tmp_path / "upload").iterdir()) == sorted(
        [*(n for n in UPLOADED if n != "evaluation.json"), SIGNATURE_FILENAME]
    )
    CenterSignature.load(tmp_path / "upload" / SIGNATURE_FILENAME).check_base(base)
    (folder / SIGNATURE_FILENAME).write_bytes(b"damaged")
    with pytest.raises(ValueError, match=SIGNATURE_FILENAME):
        prepare_upload_folder(folder, tmp_path / "upload-2")
    assert not (tmp_path / "upload-2").exists()
