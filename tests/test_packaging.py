"""The package as users install it: a built wheel (not an editable checkout), and the floors of the house."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_model_card_renders_from_a_regular_wheel_install(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)], check=True)
    wheel = next(wheels.glob("peft_medseg-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    # Every package of the checkout is in the wheel (pyproject lists them), and the card templates too.
    for init in (REPO / "peft_medseg").rglob("__init__.py"):
        assert (site / init.relative_to(REPO)).is_file(), f"{init.parent} is missing from the wheel"
    assert (site / "peft_medseg" / "hub_cards" / "center_adapter.md").is_file()
    code = """
import sys
import peft_medseg.hub.card as card
assert str(card.CARD_TEMPLATE_PATH).startswith(sys.argv[1]), card.CARD_TEMPLATE_PATH
config = {"peft_type": "VISUAL_PROMPT", "num_virtual_tokens": 10, "deep": True, "base_model_name_or_path": "org/base"}
text = str(card.render_adapter_card(config, repo_id="org/center-B"))
assert "org/center-B" in text and "PeftModel.from_pretrained" in text, text[:500]
print("rendered", card.CARD_TEMPLATE_PATH)
"""
    # From another folder, with only the installed wheel on the path ahead of the venv: no checkout to fall back on.
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(site)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rendered" in result.stdout and "hub_cards/center_adapter.md" in result.stdout


def test_a_hub_backbone_keeps_its_own_image_statistics(tmp_path):
    """`--base <Hub id or folder>`: the backbone is trained and evaluated with its image processor's mean and std."""
    from peft_medseg.models import build_segmentation_model, image_processor_for

    backbone = tmp_path / "backbone"
    torch.manual_seed(0)
    config = T.Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
    T.Dinov2Model(config).save_pretrained(backbone)
    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    T.BitImageProcessor(image_mean=mean, image_std=std).save_pretrained(backbone)

    processor = image_processor_for(str(backbone), image_size=32)
    assert list(processor.image_mean) == mean and list(processor.image_std) == std
    assert processor.size == {"height": 32, "width": 32}
    model = build_segmentation_model(str(backbone), num_labels=2, image_size=32)
    assert model.backbone.config.hidden_size == 32
    # Named bases are trained from scratch with the package's own statistics.
    scratch = image_processor_for("tiny", image_size=32)
    assert list(scratch.image_mean) == [0.5] * 3 and list(scratch.image_std) == [0.25] * 3

    # The pretrain recipe saves the backbone's statistics with the base, so training and evaluation use them.
    data = tmp_path / "data"
    sys.path.insert(0, str(REPO / "tests"))
    from test_training import make_folder_dataset

    make_folder_dataset(data, centers=("A",), images_per_center=6)
    out = tmp_path / "base"
    command = [sys.executable, str(REPO / "recipes" / "pretrain_base.py"), "--base", str(backbone), "--dataset"]
    command += [str(data), "--image_size", "32", "--num_epochs", "1", "--output_dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((out / "preprocessor_config.json").read_text())
    assert saved["image_mean"] == mean and saved["image_std"] == std
