"""The MLP update (`mlp_rank`): a per-center low-rank update of each prompted block's MLP output projection."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_head_update import perturb, pixels, tiny_base
from test_kv_prompts import MODELS as KEY_VALUE_MODELS
from test_monai3d import swin_unetr, unetr, volumes
from test_visual_prompt import ARCHITECTURES, STAGES, VIT, assert_mixed_batch_equals_per_sample_passes, upernet

import peft_medseg  # noqa: F401  (registers the method)
from peft_medseg import VisualPromptConfig
from peft_medseg.training import enable_gradient_checkpointing

CLASSIFIER = ["decode_head.classifier"]


def beit_base(seed=0):
    torch.manual_seed(seed)
    return ARCHITECTURES["beit"]().eval()


def mlp_updates(model) -> dict[str, torch.nn.Module]:
    """The updated Linear modules by their name in the base model."""
    network = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {n: m for n, m in network.named_modules() if hasattr(m, "mlp_update")}


@pytest.mark.parametrize("layers", [None, [0, 2]])
def test_mlp_update_equals_hand_written_weights_of_the_prompted_blocks(layers):
    base = tiny_base()
    config = dict(num_virtual_tokens=2, prompt_dropout=0.0, layers=layers, modules_to_save=CLASSIFIER)
    model = perturb(get_peft_model(copy.deepcopy(base), VisualPromptConfig(**config, mlp_rank=3))).eval()
    blocks = [0, 1, 2, 3] if layers is None else layers
    assert sorted(mlp_updates(model)) == [f"backbone.encoder.layer.{i}.mlp.fc2" for i in blocks]
    # The reference: the same prompts on a base whose fc2 weights are W + up @ down, written into the weights.
    reference_base = copy.deepcopy(base)
    for name, linear in mlp_updates(model).items():
        down = linear.mlp_update.vpt_down["default"].weight  # (rank, in)
        up = linear.mlp_update.vpt_up["default"].weight  # (out, rank)
        assert down.shape == (3, linear.in_features) and up.shape == (linear.out_features, 3)
        with torch.no_grad():
            reference_base.get_submodule(name).weight.add_(up @ down)
    reference = get_peft_model(reference_base, VisualPromptConfig(**config)).eval()
    # The adapter's prompts and classifier copy (not the base weights, which the reference has changed).
    state = {k: v for k, v in model.state_dict().items() if "vpt_prompt" in k or "modules_to_save" in k}
    assert not reference.load_state_dict(state, strict=False).unexpected_keys
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, reference(pixel_values=x).logits)
        with model.disable_adapter():
            torch.testing.assert_close(model(pixel_values=x).logits, base(pixel_values=x).logits)


def test_the_backward_pass_keeps_no_weight_sized_copy_of_an_updated_projection():
    # Folding the update into the weight (`W + up @ down`) would keep a new (out, in) tensor per block for the
    # backward pass: 108 MB at UNETR's widths without checkpointing. What autograd saves is counted here.
    model = get_peft_model(tiny_base(), VisualPromptConfig(num_virtual_tokens=2, prompt_dropout=0.0, mlp_rank=1))
    shapes = {tuple(linear.weight.shape) for linear in mlp_updates(model).values()}
    shapes |= {shape[::-1] for shape in shapes}  # a linear layer may save its weight transposed
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(pixel_values=pixels()).logits.sum().backward()
    weight_shaped = [t for t in saved if tuple(t.shape) in shapes]
    assert weight_shaped, "the frozen projections themselves are saved for the gradient of their input"
    # Each is a model parameter (or a view of one), no new tensor of a projection's size.
    assert all(t.untyped_storage().data_ptr() in parameter_storages for t in weight_shaped)
    # And the update was trained: its up-projection got a gradient.
    assert all(linear.mlp_update.vpt_up["default"].weight.grad is not None for linear in mlp_updates(model).values())


BLOCK_MODELS = {
    **{name: (build, "tokens") for name, build in ARCHITECTURES.items()},
    **{name: (build, "key_value") for name, build in KEY_VALUE_MODELS.items()},
    "unetr": (unetr, "tokens"),
    "swin_unetr": (swin_unetr, "key_value"),
}
MLP_OUTPUTS = {"DINOv3ViTLayer": "mlp.down_proj", "DPTViTLayer": "output.dense", "TransformerBlock": "mlp.linear2"}


@pytest.mark.parametrize("name", sorted(BLOCK_MODELS))
def test_every_architecture_updates_the_last_linear_of_each_block_mlp_starting_as_the_base(name):
    build, mode = BLOCK_MODELS[name]
    torch.manual_seed(0)
    base = build().eval()
    volume = name in ("unetr", "swin_unetr")
    x = volumes(2, size=64 if name == "swin_unetr" else 32) if volume else pixels()
    config = dict(num_virtual_tokens=2, prompt_mode=mode, prompt_dropout=0.0)
    prompts_only = get_peft_model(copy.deepcopy(base), VisualPromptConfig(**config))
    torch.manual_seed(1)
    model = get_peft_model(base, VisualPromptConfig(**config, mlp_rank=2))
    block_class = model.peft_config["default"].block_class
    relative = MLP_OUTPUTS.get(block_class, "mlp.linear2" if volume else "mlp.fc2")
    blocks = [n for n, m in model.get_base_model().named_modules() if type(m).__name__ == block_class]
    assert sorted(mlp_updates(model)) == sorted(f"{b}.{relative}" for b in blocks)
    prompts_only.load_state_dict({k: v for k, v in model.state_dict().items() if "vpt_prompt" in k}, strict=False)

    def logits(m):
        out = m(x) if volume else m(pixel_values=x)
        return out if volume else out.logits

    with torch.no_grad():  # `up` starts at zero: the update starts as the base's MLP
        torch.testing.assert_close(logits(model.eval()), logits(prompts_only.eval()))
    model.train()
    logits(model).square().mean().backward()
    ups = [p for n, p in model.named_parameters() if ".mlp_update.vpt_up." in n]
    assert ups and all(p.grad is not None and p.grad.abs().sum() > 0 for p in ups)


def two_centers(build, **config):
    """Centers A and B with prompts, MLP updates and classifier copies, all moved off their init."""
    config = dict(num_virtual_tokens=3, prompt_dropout=0.0, mlp_rank=2, modules_to_save=CLASSIFIER, **config)
    model = get_peft_model(build(), VisualPromptConfig(**config), adapter_name="A")
    torch.manual_seed(1)
    model.add_adapter("B", VisualPromptConfig(**config))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vpt_" in name or "modules_to_save" in name:
                p.requires_grad_(True)
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


# BEiT takes the token path (base rows run as their own group through each block); DINOv2 the key/value path.
MIXED = {"beit": beit_base, "dinov2": tiny_base}


@pytest.mark.parametrize("name", sorted(MIXED))
def test_mixed_batch_equals_per_sample_passes(name):
    assert_mixed_batch_equals_per_sample_passes(
        two_centers(MIXED[name]).eval(), ["A", "__base__", "B", "A", "__base__"]
    )


@pytest.mark.parametrize("name", sorted(MIXED))
def test_mixed_batch_training_with_and_without_checkpointing_gives_the_gradients_of_separate_passes(name):
    names = ["A", "B", "__base__", "B"]
    x = pixels(len(names))
    with torch.no_grad():
        shape = MIXED[name]()(pixel_values=x).logits.shape
    target = torch.randn(shape, generator=torch.Generator().manual_seed(3))

    def mixed_gradients(checkpointing):
        model = two_centers(MIXED[name]).train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        (model(pixel_values=x, adapter_names=names).logits - target).square().sum().backward()
        return model, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model, plain = mixed_gradients(False)
    model.zero_grad()
    for center in ["A", "B"]:
        rows = [i for i, n in enumerate(names) if n == center]
        model.set_adapter(center)
        model.base_model.set_requires_grad(["A", "B"], True)
        (model(pixel_values=x[rows]).logits - target[rows]).square().sum().backward()
    separate = {n: p.grad for n, p in model.named_parameters() if n in plain}
    _, checkpointed = mixed_gradients(True)
    assert any(".mlp_update.vpt_up.A" in n for n in plain) and any(".mlp_update.vpt_down.B" in n for n in plain)
    for n, grad in plain.items():
        assert grad.abs().max() > 0, n
        torch.testing.assert_close(grad, separate[n], atol=1e-4, rtol=1e-4, msg=n)
        torch.testing.assert_close(checkpointed[n], grad, atol=1e-5, rtol=1e-4, msg=n)


def test_save_load_a_second_center_and_unload(tmp_path):
    model = perturb(get_peft_model(tiny_base(), VisualPromptConfig(num_virtual_tokens=2, mlp_rank=2))).eval()
    model.save_pretrained(tmp_path / "A")
    saved = load_file(tmp_path / "A" / "adapter_model.safetensors")
    assert sum(".mlp_update.vpt_" in k for k in saved) == 2 * 4  # down and up of every prompted block
    x = pixels()
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    # A second center loads next to the first: the MLP updates already injected are not part of the base's shape.
    model.load_adapter(tmp_path / "A", adapter_name="A")
    model.set_adapter("A")
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, expected)
    fresh = PeftModel.from_pretrained(tiny_base(), tmp_path / "A").eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(pixel_values=x).logits, expected)
    unloaded = fresh.unload()
    assert not mlp_updates(unloaded) and not any("forward" in vars(m) for m in unloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(unloaded(pixel_values=x).logits, tiny_base()(pixel_values=x).logits)


def test_a_missing_mlp_update_tensor_is_refused_and_the_base_is_left_as_it_was(tmp_path):
    model = perturb(get_peft_model(tiny_base(), VisualPromptConfig(num_virtual_tokens=2, mlp_rank=2)))
    model.save_pretrained(tmp_path / "A")
    weights = load_file(tmp_path / "A" / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "layer.1.mlp.fc2.mlp_update.vpt_up" not in k},
              tmp_path / "A" / "adapter_model.safetensors")  # fmt: skip
    base = tiny_base()
    with pytest.raises(ValueError, match=r"missing prompt tensors .*layer\.1\.mlp\.fc2\.mlp_update\.vpt_up"):
        PeftModel.from_pretrained(base, tmp_path / "A")
    assert not mlp_updates(base) and not any("forward" in vars(m) for m in base.modules())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mlp_rank": -1}, "mlp_rank must be an int in 0..1024"),
        ({"mlp_rank": True}, "mlp_rank must be an int"),
        ({"mlp_rank": 2.0}, "mlp_rank must be an int"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VisualPromptConfig(num_virtual_tokens=2, **kwargs)


def test_a_block_without_the_expected_mlp_projection_fails_before_any_change():
    # DINOv2 with a SwiGLU MLP has no `mlp.fc2`.
    base = upernet(T.Dinov2Config(**VIT, use_swiglu_ffn=True, out_features=STAGES)).eval()
    x = pixels()
    with torch.no_grad():
        expected = base(pixel_values=x).logits
    with pytest.raises(ValueError, match=r"mlp_rank: backbone\.encoder\.layer\.0\.mlp\.fc2 should be the block's MLP"):
        get_peft_model(base, VisualPromptConfig(num_virtual_tokens=2, mlp_rank=1))
    assert not any(hasattr(m, "visual_prompt") or "forward" in vars(m) for m in base.modules())
    with torch.no_grad():
        torch.testing.assert_close(base(pixel_values=x).logits, expected)
