"""Deep token prompts computed as keys/values of the block's attention: equal to the token path, same adapter files."""

import copy

import pytest
import torch
import transformers as T
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from test_visual_prompt import STAGES, VIT, pixels, prompt_params, tiny_base, upernet

import peft_medseg  # noqa: F401
from peft_medseg import VisualPromptConfig
from peft_medseg.training import enable_gradient_checkpointing, uses_gradient_checkpointing
from peft_medseg.visual_prompt.kv_layer import DeepKeyValuePromptLayer
from peft_medseg.visual_prompt.layer import VisualPromptLayer

BASES = {
    "dinov2": tiny_base,
    "dinov2_registers": lambda: upernet(
        T.Dinov2WithRegistersConfig(**VIT, num_register_tokens=2, out_features=STAGES, reshape_hidden_states=True)
    ).eval(),
    "dinov3_rope": lambda: upernet(T.DINOv3ViTConfig(**VIT, num_register_tokens=2, out_features=STAGES)).eval(),
}


@pytest.fixture
def token_path(monkeypatch):
    """Force the token path of `VisualPromptLayer` (prompts concatenated into the sequence) for every block."""

    def force():
        monkeypatch.setattr(DeepKeyValuePromptLayer, "runs_as_key_values", lambda self, rows: False)

    return force


def build(name, seed=0, **config):
    torch.manual_seed(seed)
    base = BASES[name]()
    config = {"num_virtual_tokens": 4, "prompt_dropout": 0.0, **config}
    return get_peft_model(base, VisualPromptConfig(**config))


@pytest.mark.parametrize("name", sorted(BASES))
def test_key_value_path_equals_token_path_outputs_and_gradients(name, monkeypatch):
    model = build(name)
    layers = [m for m in model.modules() if isinstance(m, VisualPromptLayer)]
    assert layers and all(isinstance(m, DeepKeyValuePromptLayer) for m in layers)
    x = pixels(3)
    results = {}
    for path in ("key_value", "tokens"):
        if path == "tokens":
            monkeypatch.setattr(DeepKeyValuePromptLayer, "runs_as_key_values", lambda self, rows: False)
        model.eval()
        with torch.no_grad():
            maps = model.base_model.model.backbone(x).feature_maps
        model.train()
        model.zero_grad()
        model(pixel_values=x).logits.square().mean().backward()
        results[path] = (maps, [p.grad.clone() for p in prompt_params(model)])
    for got, want in zip(results["key_value"][0], results["tokens"][0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for got, want in zip(results["key_value"][1], results["tokens"][1]):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_mixed_batch_with_base_rows_equals_per_sample(token_path):
    model = build("dinov2")
    model.add_adapter("B", VisualPromptConfig(num_virtual_tokens=4, prompt_dropout=0.0))
    model.eval()
    x = pixels(4)
    names = ["default", "__base__", "B", "default"]
    with torch.no_grad():
        mixed = model(pixel_values=x, adapter_names=names).logits
        token_path()
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    single = model(pixel_values=x[i : i + 1]).logits
            else:
                model.set_adapter(name)
                single = model(pixel_values=x[i : i + 1]).logits
            torch.testing.assert_close(mixed[i : i + 1], single, atol=1e-5, rtol=1e-5)


def test_shallow_prompts_keep_the_token_path():
    model = build("dinov2", deep=False)
    layers = [m for m in model.modules() if isinstance(m, DeepKeyValuePromptLayer)]
    # Shallow prompts' outputs go on to the next block: never skipped.
    assert all(not layer.runs_as_key_values(["default"]) for layer in layers)


def test_adapter_saved_on_the_token_path_loads_and_gives_the_same_outputs(tmp_path, monkeypatch):
    # An adapter trained and saved before deep prompts ran as keys/values (the token path for every block) ...
    monkeypatch.setattr(DeepKeyValuePromptLayer, "runs_as_key_values", lambda self, rows: False)
    model = build("dinov2").eval()
    x = pixels()
    with torch.no_grad():
        token_logits = model(pixel_values=x).logits
    model.save_pretrained(tmp_path / "old")
    monkeypatch.undo()
    # ... loads into the key/value path with the same tensors and gives the same outputs.
    reloaded = PeftModel.from_pretrained(tiny_base(), tmp_path / "old").eval()
    assert all(
        layer.runs_as_key_values(["default"])
        for layer in reloaded.modules()
        if isinstance(layer, DeepKeyValuePromptLayer)
    )
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, token_logits, atol=1e-5, rtol=1e-5)
    reloaded.save_pretrained(tmp_path / "new")
    keys = []
    for folder in ("old", "new"):
        with safe_open(tmp_path / folder / "adapter_model.safetensors", framework="pt") as handle:
            keys.append(sorted(handle.keys()))
    assert keys[0] == keys[1] and len(keys[0]) == 4


def test_reloaded_adapter_runs_on_the_key_value_path(tmp_path):
    model = build("dinov2")
    model.save_pretrained(tmp_path)
    x = pixels()
    with torch.no_grad():
        expected = model.eval()(pixel_values=x).logits
    reloaded = PeftModel.from_pretrained(tiny_base(), tmp_path).eval()
    assert any(isinstance(m, DeepKeyValuePromptLayer) for m in reloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, expected, atol=0, rtol=0)


def test_deepcopy_and_unload_restore_the_attention():
    model = build("dinov2").eval()
    x = pixels()
    with torch.no_grad():
        expected = model(pixel_values=x).logits
        copied = copy.deepcopy(model)
        torch.testing.assert_close(copied(pixel_values=x).logits, expected, atol=0, rtol=0)
    copied_block = copied.base_model.model.backbone.encoder.layer[0]
    assert copied_block.visual_prompt.prompt_norm is copied_block.norm1  # the copy's own norm, not the original's
    base = model.unload()
    for block in base.backbone.encoder.layer:
        assert "forward" not in block.__dict__ and "forward" not in block.attention.__dict__
    with torch.no_grad():
        torch.testing.assert_close(base(pixel_values=x).logits, tiny_base()(pixel_values=x).logits, atol=0, rtol=0)


@pytest.mark.parametrize("deep", [True, False])
def test_enable_gradient_checkpointing_gives_equal_prompt_gradients(deep):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        base = tiny_base()
        model = get_peft_model(base, VisualPromptConfig(num_virtual_tokens=3, deep=deep, prompt_dropout=0.0))
        if checkpointing:
            assert enable_gradient_checkpointing(model) == ["base_model.model.backbone"]
            assert all(block.gradient_checkpointing for block in base.backbone.encoder.layer)
        model.train()
        model(pixel_values=pixels(4)).logits.square().mean().backward()
        grads.append([p.grad.clone() for p in prompt_params(model)])
    for a, b in zip(*grads):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_defaults_and_models_without_support():
    assert uses_gradient_checkpointing("vpt-deep") and uses_gradient_checkpointing("vpt-deep-norms")
    assert not uses_gradient_checkpointing("full") and not uses_gradient_checkpointing("lora")
    assert uses_gradient_checkpointing("full", True) and not uses_gradient_checkpointing("vpt-deep", False)
    segformer = T.SegformerForSemanticSegmentation(
        T.SegformerConfig(num_labels=2, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], decoder_hidden_size=16)
    )
    assert enable_gradient_checkpointing(segformer) == [""]
    with pytest.raises(ValueError, match="no submodel that supports activation checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_mixed_batch_training_with_checkpointing_gives_the_gradients_without():
    grads = []
    for checkpointing in (False, True):
        model = build("dinov2")
        model.add_adapter("B", VisualPromptConfig(num_virtual_tokens=4, prompt_dropout=0.0))
        for parameter in prompt_params(model, "B"):
            parameter.requires_grad_(True)
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        names = ["default", "B", "__base__", "B"]
        model(pixel_values=pixels(4), adapter_names=names).logits.square().mean().backward()
        grads.append([p.grad.clone() for p in prompt_params(model) + prompt_params(model, "B")])
    for a, b in zip(*grads):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
