"""The head update (`head_rank`): a per-center low-rank 1x1 update of the decode head's convolutions, in the adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_medseg
from peft_medseg import VisualPromptConfig
from peft_medseg.models import build_segmentation_model

CLASSIFIER = ["decode_head.classifier"]


def tiny_base(seed=0):
    torch.manual_seed(seed)
    return build_segmentation_model("tiny", 3, image_size=32).eval()


def pixels(batch=2, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def perturb(model, scale=0.05, seed=2):
    """Trained-looking adapter weights (a zero `up` would hide a wrong route or a failed load)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))
    return model


def test_head_update_equals_a_hand_written_update_of_every_head_conv():
    base = tiny_base()
    model = perturb(get_peft_model(copy.deepcopy(base), VisualPromptConfig(num_virtual_tokens=2, head_rank=3,
                                                                           modules_to_save=CLASSIFIER))).eval()  # fmt: skip
    # Reference: the same prompts and classifier without head updates, and each head conv patched by hand.
    reference = get_peft_model(
        copy.deepcopy(base), VisualPromptConfig(num_virtual_tokens=2, modules_to_save=CLASSIFIER)
    )
    state = {k: v for k, v in model.state_dict().items() if "head_update" not in k}
    reference.load_state_dict(state, strict=True)
    reference.eval()
    updated = {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "head_update")}
    assert set(updated) == {
        n for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d) and n.startswith("decode_head.")
    } - {"decode_head.classifier"}
    for name, conv in updated.items():
        down = conv.head_update.vpt_down["default"].weight[:, :, 0, 0]  # (rank, in)
        up = conv.head_update.vpt_up["default"].weight[:, :, 0, 0]  # (out, rank)
        target = reference.base_model.model.get_submodule(name)
        target.register_forward_hook(
            lambda m, i, o, down=down, up=up: o + torch.einsum("or,ri,bihw->bohw", up, down, i[0])
        )
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values=x).logits, reference(pixel_values=x).logits, atol=1e-5, rtol=1e-5
        )


def test_new_adapter_starts_as_the_base_head_and_training_leaves_the_base_bit_identical():
    base = tiny_base()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    x = pixels()
    with torch.no_grad():
        without = get_peft_model(copy.deepcopy(base), VisualPromptConfig(num_virtual_tokens=2))(pixel_values=x).logits
    torch.manual_seed(0)
    with_head = get_peft_model(copy.deepcopy(base), VisualPromptConfig(num_virtual_tokens=2, head_rank=2))
    torch.manual_seed(0)
    plain = get_peft_model(copy.deepcopy(base), VisualPromptConfig(num_virtual_tokens=2))
    with_head.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(with_head(pixel_values=x).logits, plain(pixel_values=x).logits)
    del without
    # A few training steps: prompts and updates move, the base does not.
    model = get_peft_model(base, VisualPromptConfig(num_virtual_tokens=2, head_rank=2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(pixel_values=x).logits.square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    ups = [p for n, p in model.named_parameters() if "vpt_up" in n]
    assert ups and all(p.abs().sum() > 0 for p in ups)
    unloaded = model.unload()
    assert not any(hasattr(m, "head_update") for m in unloaded.modules())
    assert all(torch.equal(original[k], v) for k, v in unloaded.state_dict().items())


@pytest.mark.parametrize("depthwise_of_b", [False, True])
def test_round_trip_and_mixed_batch_equal_per_sample(tmp_path, depthwise_of_b):
    """Two centers' adapters in one batch (with `depthwise_of_b`, only B has depthwise filters) equal each row alone."""
    base = tiny_base()
    for center, seed, depthwise in (("A", 3, False), ("B", 4, depthwise_of_b)):
        config = VisualPromptConfig(
            num_virtual_tokens=2, head_rank=2, head_depthwise=depthwise, modules_to_save=CLASSIFIER
        )
        perturb(get_peft_model(copy.deepcopy(base), config), seed=seed).save_pretrained(tmp_path / center)
    assert any("head_update.vpt_down" in k for k in load_file(tmp_path / "A" / "adapter_model.safetensors"))
    saved_b = load_file(tmp_path / "B" / "adapter_model.safetensors")
    assert any("head_update.vpt_depthwise" in k for k in saved_b) is depthwise_of_b
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "A"), adapter_name="A")
    model.load_adapter(str(tmp_path / "B"), adapter_name="B")
    model.eval()
    # The second adapter updates the base's convs, not the first adapter's update layers.
    assert not [n for n, _ in model.named_modules() if n.count("head_update") > 1]
    x = pixels(batch=3)
    names = ["B", peft_medseg.BASE_ADAPTER_NAME, "A"]
    with torch.no_grad():
        mixed = model(pixel_values=x, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == peft_medseg.BASE_ADAPTER_NAME:
                alone = base(pixel_values=x[row : row + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(pixel_values=x[row : row + 1]).logits
            torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=1e-5)
    # An adapter file that lost a head tensor is refused, and the base is left as it was.
    weights = load_file(tmp_path / "A" / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "fpn_bottleneck.conv.head_update.vpt_up" not in k},
              tmp_path / "A" / "adapter_model.safetensors")  # fmt: skip
    fresh = tiny_base()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="missing"):
        PeftModel.from_pretrained(fresh, str(tmp_path / "A"))
    assert not any(hasattr(m, "head_update") for m in fresh.modules())
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"head_rank": -1}, "head_rank must be an int"),
        ({"head_rank": 2, "head_modules": ["decode_head\\.nothing"]}, "matches no Conv2d"),
        ({"head_rank": 2, "head_modules": ["decode_head\\.classifier"], "modules_to_save": CLASSIFIER}, "not both"),
        ({"head_rank": 2, "head_modules": ["("]}, "not a regular expression"),
        ({"head_rank": 0, "head_depthwise": True}, "needs head_rank >= 1"),
        ({"head_rank": 2, "head_depthwise": "yes"}, "head_depthwise must be a bool"),
    ],
)
def test_bad_head_config_is_refused_before_the_model_changes(fields, message):
    base = tiny_base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        get_peft_model(base, VisualPromptConfig(num_virtual_tokens=2, **fields))
    assert not any(hasattr(m, "head_update") or hasattr(m, "visual_prompt") for m in base.modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize(
    "conv, folds",
    [
        (torch.nn.Conv3d(4, 5, 3, padding=1, stride=2), True),  # a strided 3D conv: the centre tap still lines up
        (torch.nn.Conv2d(4, 5, 1), True),
        (torch.nn.Conv2d(4, 5, 3, padding=1, padding_mode="replicate"), False),  # not zero padding: added instead
    ],
)
def test_update_of_one_conv_equals_the_conv_plus_up_down_by_hand(conv, folds):
    from peft_medseg.visual_prompt.head_layer import HeadUpdateLayer

    torch.manual_seed(0)
    conv.head_update = HeadUpdateLayer(conv)
    conv.head_update.update_layer("a", 2)
    conv.head_update.set_adapter(["a"])
    torch.nn.init.normal_(conv.head_update.vpt_up["a"].weight)
    assert conv.head_update.folds_into_weight is folds
    x = torch.randn(2, 4, *[9] * (conv.weight.ndim - 2))
    down = conv.head_update.vpt_down["a"].weight.flatten(1)  # (rank, in)
    up = conv.head_update.vpt_up["a"].weight.flatten(1)  # (out, rank)
    strided = x[(slice(None), slice(None), *[slice(None, None, s) for s in conv.stride])]
    expected = type(conv).forward(conv, x) + torch.einsum("or,ri,bi...->bo...", up, down, strided)
    torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)


def test_depthwise_filter_equals_a_hand_written_filter_of_each_updated_conv_output_off_pooled_maps():
    """`head_depthwise`: each updated head conv's output `y` becomes `y + depthwise(y)`, a 3x3 filter per channel
    (`groups=channels`, zero padding), after its low-rank update; a new adapter's filters start at zero."""
    base = tiny_base()
    config = dict(num_virtual_tokens=2, head_rank=2, modules_to_save=CLASSIFIER)
    torch.manual_seed(0)
    fresh = get_peft_model(copy.deepcopy(base), VisualPromptConfig(head_depthwise=True, **config)).eval()
    filters = [p for n, p in fresh.named_parameters() if ".vpt_depthwise." in n]
    assert filters and all(p.requires_grad and not p.any() for p in filters)
    model = perturb(fresh).eval()
    reference = get_peft_model(copy.deepcopy(base), VisualPromptConfig(**config)).eval()
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "vpt_depthwise" not in k}, strict=True)
    network = model.base_model.model
    updated = [name for name, module in network.named_modules() if hasattr(module, "head_update")]
    filtered = [name for name in updated if "default" in network.get_submodule(name).head_update.vpt_depthwise]
    # Every updated conv but UperNet's pyramid-pooling branches, which act on 1x1..6x6 pooled maps.
    assert [n for n in updated if n not in filtered] == [n for n in updated if ".psp_modules." in n] != []
    for name in filtered:
        kernel = network.get_submodule(name).head_update.vpt_depthwise["default"].weight  # (channels, 1, 3, 3)

        def by_hand(module, inputs, output, kernel=kernel):
            channels = output.shape[1]
            taps = torch.nn.functional.pad(output, (1, 1, 1, 1))
            height, width = output.shape[-2:]
            response = sum(
                kernel[:, 0, i, j].view(1, channels, 1, 1) * taps[:, :, i : i + height, j : j + width]
                for i in range(3)
                for j in range(3)
            )
            return output + response

        reference.base_model.model.get_submodule(name).register_forward_hook(by_hand)
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values=x).logits, reference(pixel_values=x).logits, atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("config", ["tiny", "beit-tiny"])
def test_depthwise_filters_skip_exactly_the_convs_on_pooled_maps(config):
    """transformers' UperNet and BEiT heads: every decode-head conv but the classifier is updated, and every updated
    conv gets a filter except the four pyramid-pooling branches (which act on 1x1, 2x2, 3x3 and 6x6 pooled maps)."""
    torch.manual_seed(0)
    base = build_segmentation_model(config, 2, image_size=32)
    convs = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d) and n.startswith("decode_head.")]
    pyramid = [n for n in convs if ".psp_modules." in n]
    model = get_peft_model(
        base, VisualPromptConfig(num_virtual_tokens=2, head_rank=2, head_depthwise=True, modules_to_save=CLASSIFIER)
    )
    names = [n for n, _ in model.named_parameters()]
    updated = {n.split(".head_update.")[0].removeprefix("base_model.model.") for n in names if ".vpt_down." in n}
    filtered = {n.split(".head_update.")[0].removeprefix("base_model.model.") for n in names if ".vpt_depthwise." in n}
    assert len(pyramid) == 4 and updated == set(convs) - set(CLASSIFIER)
    assert filtered == updated - set(pyramid)


def test_depthwise_filter_of_a_3d_conv_equals_a_per_channel_conv3d_by_hand():
    """`head_depthwise` on a Conv3d (MONAI heads): a 3x3x3 filter per output channel, zero padding, added to the
    low-rank-updated output."""
    from peft_medseg.visual_prompt.head_layer import HeadUpdateLayer

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(4, 5, 3, padding=1)
    conv.head_update = HeadUpdateLayer(conv)
    conv.head_update.update_layer("a", 2, depthwise=True)
    conv.head_update.set_adapter(["a"])
    torch.nn.init.normal_(conv.head_update.vpt_up["a"].weight)
    torch.nn.init.normal_(conv.head_update.vpt_depthwise["a"].weight)
    x = torch.randn(2, 4, 6, 6, 6)
    down = conv.head_update.vpt_down["a"].weight.flatten(1)  # (rank, in)
    up = conv.head_update.vpt_up["a"].weight.flatten(1)  # (out, rank)
    updated = type(conv).forward(conv, x) + torch.einsum("or,ri,bi...->bo...", up, down, x)
    kernel = conv.head_update.vpt_depthwise["a"].weight  # (5, 1, 3, 3, 3)
    taps = torch.nn.functional.pad(updated, (1,) * 6)
    filtered = sum(
        kernel[:, 0, i, j, k].view(1, 5, 1, 1, 1) * taps[:, :, i : i + 6, j : j + 6, k : k + 6]
        for i in range(3)
        for j in range(3)
        for k in range(3)
    )
    torch.testing.assert_close(conv(x), updated + filtered, atol=1e-4, rtol=1e-4)
