"""Key/value prompts (`prompt_mode="key_value"`): equal to deep VPT on a ViT, and SegFormer/Swin through peft's API."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as T
from peft import PeftModel, get_peft_model

import peft_medseg  # noqa: F401  (registers the method)
from peft_medseg import VisualPromptConfig

STAGES = ["stage1", "stage2", "stage3", "stage4"]
VIT = dict(
    hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
)
KV = dict(prompt_mode="key_value", prompt_dropout=0.0)


def upernet(backbone_config):
    return T.UperNetForSemanticSegmentation(
        T.UperNetConfig(
            backbone_config=backbone_config,
            hidden_size=16,
            auxiliary_in_channels=backbone_config.hidden_size,
            use_auxiliary_head=False,
            num_labels=3,
        )
    )


def segformer(**overrides):
    config = dict(
        num_labels=3,
        hidden_sizes=[8, 16, 16, 16],
        depths=[1, 1, 1, 1],
        decoder_hidden_size=16,
        num_attention_heads=[1, 1, 1, 1],
    )
    return T.SegformerForSemanticSegmentation(T.SegformerConfig(**{**config, **overrides}))


def upernet_swin(**overrides):
    # depths 2 in the first stages: their second block attends in shifted windows (with the cyclic-shift mask).
    config = dict(embed_dim=8, depths=[2, 2, 1, 1], num_heads=[1, 2, 2, 2], image_size=32, window_size=2)
    return upernet(T.SwinConfig(**{**config, **overrides}, out_features=STAGES))


MODELS = {"segformer": segformer, "upernet_swin": upernet_swin}
HEAD = "decode_head.classifier"  # the last classifier conv of both heads


def build(name, seed=0, **overrides):
    torch.manual_seed(seed)
    return MODELS[name](**overrides).eval()


def pixels(batch=2, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def prompt_params(model, adapter="default"):
    return [p for n, p in model.named_parameters() if "vpt_prompt" in n and n.endswith(f".{adapter}")]


def enlarge_prompts(model, adapter="default", scale=20.0):
    # Tiny random models barely react to VPT-initialised prompts; larger ones make every comparison meaningful.
    with torch.no_grad():
        for p in prompt_params(model, adapter):
            p.mul_(scale)


# --------------------------------------------------------------------------- the proof: it is deep VPT
@pytest.mark.parametrize("registers", [0, 2])
def test_key_value_mode_equals_token_level_deep_vpt_on_a_vit(registers):
    torch.manual_seed(0)
    if registers:
        backbone = T.Dinov2WithRegistersConfig(**VIT, num_register_tokens=registers, out_features=STAGES)
    else:
        backbone = T.Dinov2Config(**VIT, out_features=STAGES, reshape_hidden_states=True)
    base = upernet(backbone).eval()
    tokens = get_peft_model(copy.deepcopy(base), VisualPromptConfig(num_virtual_tokens=5, prompt_dropout=0.0)).eval()
    key_value = get_peft_model(copy.deepcopy(base), VisualPromptConfig(num_virtual_tokens=5, **KV)).eval()
    enlarge_prompts(tokens)
    token_prompts = prompt_params(tokens)
    kv_prompts = prompt_params(key_value)
    assert len(token_prompts) == len(kv_prompts) == 4
    with torch.no_grad():
        for source, target in zip(token_prompts, kv_prompts):
            target.copy_(source)
    x = pixels()
    with torch.no_grad():
        got = key_value.base_model.model.backbone(x).feature_maps
        want = tokens.base_model.model.backbone(x).feature_maps
        plain = base.backbone(x).feature_maps
        torch.testing.assert_close(key_value(pixel_values=x).logits, tokens(pixel_values=x).logits, atol=1e-5, rtol=0)
    for g, w, p in zip(got, want, plain):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
        assert (g - p).abs().max() > 1e-2  # and the prompts really act


# --------------------------------------------------------------------------- each layout against a hand computation
def manual_attention(attention, hidden_states, kv_states, prompts, norm, bias=None):
    """softmax(q kᵀ·s + bias) v with the prompts' keys/values appended, written out."""

    def heads(t):
        return t.view(*t.shape[:-1], -1, attention.head_dim).transpose(1, 2)

    tokens = norm(prompts).expand(hidden_states.shape[0], -1, -1)
    q = heads(attention.q_proj(hidden_states))
    k = torch.cat([heads(attention.k_proj(kv_states)), heads(attention.k_proj(tokens))], dim=2)
    v = torch.cat([heads(attention.v_proj(kv_states)), heads(attention.v_proj(tokens))], dim=2)
    scores = q @ k.transpose(-1, -2) * attention.scaling
    if bias is not None:
        scores = scores + torch.nn.functional.pad(bias, (0, prompts.shape[0]))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
    return attention.o_proj(out)


def test_segformer_prompts_join_the_reduced_sequence_after_its_norm():
    model = get_peft_model(build("segformer"), VisualPromptConfig(num_virtual_tokens=3, **KV)).eval()
    enlarge_prompts(model)
    blocks = [m for m in model.modules() if type(m).__name__ == "SegformerLayer"]
    attention = blocks[0].attention
    assert attention.sequence_reduction_ratio == 8  # the first stage reduces keys/values 8x8-fold
    x = torch.randn(2, 8 * 8, 8)
    with torch.no_grad():
        got, _ = attention(x, 8, 8)
        reduced = attention.sequence_reduction(x, 8, 8)
        prompts = attention.visual_prompt.vpt_prompt["default"]
        want = manual_attention(attention, x, reduced, prompts, attention.sequence_reduction.layer_norm)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # A stage without reduction normalises the prompts with the block's own pre-attention norm.
    last = blocks[-1]
    assert last.attention.sequence_reduction_ratio == 1
    assert last.attention.visual_prompt.prompt_norm is last.layernorm_before


def test_swin_prompts_are_shared_by_every_window_without_bias_or_shift_mask():
    model = get_peft_model(build("upernet_swin"), VisualPromptConfig(num_virtual_tokens=3, **KV)).eval()
    enlarge_prompts(model)
    layers = [m for m in model.modules() if type(m).__name__ == "SwinLayer"]
    assert layers[1].shift_size > 0  # the shifted-window path is exercised by the model tests too
    attention = layers[1].attention
    windows, area = 4, 4  # 2 images x 4 windows of 2x2 tokens
    x = torch.randn(2 * windows, area, 8)
    mask = torch.where(torch.rand(windows, area, area) > 0.5, -100.0, 0.0)
    with torch.no_grad():
        got, _ = attention(x, mask)
        prompts = attention.visual_prompt.vpt_prompt["default"]
        bias = attention.relative_position_bias() + mask.repeat(2, 1, 1).unsqueeze(1)
        want = manual_attention(attention, x, x, prompts, layers[1].layernorm_before, bias)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- models through peft
@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward_disable_unload_and_frozen_base(name):
    # Frozen as peft freezes it: on some CPUs torch's linear kernel differs in the last bit between a weight that
    # requires grad and one that does not, even under no_grad (measured on SegFormer's decode head: 3e-8).
    base = build(name).requires_grad_(False)
    x = pixels(3)
    with torch.no_grad():
        expected = base(pixel_values=x).logits
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(
        base, VisualPromptConfig(num_virtual_tokens=4, prompt_mode="key_value", modules_to_save=[HEAD])
    )
    attentions = [m for m in model.modules() if hasattr(m, "visual_prompt")]
    # One prompt set per attention layer, at that layer's width; nothing else of the base trains.
    assert [p.shape for p in prompt_params(model)] == [(4, a.k_proj.in_features) for a in attentions]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("vpt_prompt" in n or "modules_to_save" in n for n in trainable)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss = model(pixel_values=x).logits.square().mean()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompt_params(model))
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        assert model(pixel_values=x).logits.shape == expected.shape
        assert (model(pixel_values=x).logits - expected).abs().max() > 1e-4
        with model.disable_adapter():
            torch.testing.assert_close(model(pixel_values=x).logits, expected, atol=0, rtol=0)
    unloaded = model.unload()
    assert not any("visual_prompt" in n or "modules_to_save" in n for n, _ in unloaded.named_modules())
    assert all("forward" not in m.__dict__ for m in unloaded.modules())
    after = unloaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        torch.testing.assert_close(unloaded(pixel_values=x).logits, expected, atol=0, rtol=0)


MIT = {  # (hidden_sizes, num_attention_heads) of SegFormer's MiT-b0..b5; they differ in depth too, covered by b0
    "b0": ([32, 64, 160, 256], [1, 2, 5, 8]),
    "b1-b5": ([64, 128, 320, 512], [1, 2, 5, 8]),
}


@pytest.mark.parametrize("size", sorted(MIT))
def test_every_mit_size(size):
    hidden_sizes, heads = MIT[size]
    depths = [2, 2, 2, 2] if size == "b0" else [1, 1, 1, 1]
    torch.manual_seed(0)
    base = T.SegformerForSemanticSegmentation(
        T.SegformerConfig(
            num_labels=2, hidden_sizes=hidden_sizes, num_attention_heads=heads, depths=depths, decoder_hidden_size=32
        )
    ).eval()
    model = get_peft_model(base, VisualPromptConfig(num_virtual_tokens=10, prompt_mode="key_value"))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 10 * sum(d * w for d, w in zip(depths, hidden_sizes))
    model.train()
    model(pixel_values=torch.randn(2, 3, 64, 64)).logits.square().mean().backward()
    assert all(p.grad.abs().sum() > 0 for p in prompt_params(model))


LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch, transformers as T
    import peft_medseg
    from peft import PeftModel
    base = T.AutoModelForSemanticSegmentation.from_pretrained(sys.argv[1]).eval()
    model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
    model.load_adapter(sys.argv[2] + "/B", adapter_name="B")
    x = torch.load(sys.argv[3])
    with torch.no_grad():
        torch.save(model(pixel_values=x, adapter_names=["default", "B", "__base__"]).logits, sys.argv[4])
    """
)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_and_load_in_a_fresh_process_gives_identical_logits(tmp_path, name):
    base = build(name)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(
        base, VisualPromptConfig(num_virtual_tokens=3, prompt_mode="key_value", modules_to_save=[HEAD])
    )
    model.add_adapter("B", VisualPromptConfig(num_virtual_tokens=3, prompt_mode="key_value", modules_to_save=[HEAD]))
    enlarge_prompts(model)
    with torch.no_grad():
        model.base_model.model.decode_head.classifier.modules_to_save.default.weight.add_(0.1)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    saved = VisualPromptConfig.from_pretrained(tmp_path / "adapter")
    assert saved.prompt_mode == "key_value" and saved.num_prefix_tokens == 0
    x = pixels(3)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model(pixel_values=x, adapter_names=["default", "B", "__base__"]).logits
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    args = [str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")]
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    reloaded = torch.load(tmp_path / "y.pt")
    # The prompted rows are bit-identical; the "__base__" row runs as a sub-batch of one, whose float summation
    # order may differ from process to process (seen: 3e-10).
    torch.testing.assert_close(reloaded[:2], expected[:2], atol=0, rtol=0)
    torch.testing.assert_close(reloaded[2:], expected[2:], atol=1e-6, rtol=1e-6)


def three_centers(name):
    kwargs = dict(num_virtual_tokens=4, modules_to_save=[HEAD], **KV)
    # No stochastic depth or head dropout: their randomness would make separate passes differ from a mixed one.
    deterministic = dict(drop_path_rate=0.0, **({"classifier_dropout_prob": 0.0} if name == "segformer" else {}))
    model = get_peft_model(build(name, **deterministic), VisualPromptConfig(**kwargs), adapter_name="A")
    for adapter, seed in (("B", 1), ("C", 2)):
        torch.manual_seed(seed)
        model.add_adapter(adapter, VisualPromptConfig(**kwargs))
    with torch.no_grad():  # distinct heads per center, so routing the head matters
        for i, adapter in enumerate("ABC"):
            enlarge_prompts(model, adapter)
            model.base_model.model.decode_head.classifier.modules_to_save[adapter].weight.add_(0.05 * (i + 1))
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mixed_batch_equals_per_sample_set_adapter(name):
    model = three_centers(name).eval()
    names = ["A", "C", "__base__", "B", "A", "__base__"]
    x = pixels(len(names))
    with torch.no_grad():
        mixed = model(pixel_values=x, adapter_names=names).logits
        singles = []
        for i, adapter in enumerate(names):
            if adapter == "__base__":
                with model.disable_adapter():
                    singles.append(model(pixel_values=x[i : i + 1]).logits)
            else:
                model.set_adapter(adapter)
                singles.append(model(pixel_values=x[i : i + 1]).logits)
    for i, single in enumerate(singles):
        torch.testing.assert_close(mixed[i : i + 1], single, atol=1e-5, rtol=1e-5)
    assert (singles[0] - singles[1]).abs().max() > 1e-3  # centers differ, so routing is really tested


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mixed_batch_training_gives_the_gradients_of_separate_passes(name):
    model = three_centers(name)
    model.train()
    model.base_model.set_requires_grad(["A", "B", "C"], True)
    names = ["A", "B", "C", "A", "__base__", "B"]
    x = pixels(len(names))
    target = torch.randn(len(names), 3, *model(pixel_values=x[:1]).logits.shape[2:])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    (model(pixel_values=x, adapter_names=names).logits - target).square().sum().backward()
    mixed = {n: p.grad.clone() for n, p in trainable.items()}
    model.zero_grad()
    for center in "ABC":
        rows = [i for i, n in enumerate(names) if n == center]
        model.set_adapter(center)
        model.base_model.set_requires_grad(["A", "B", "C"], True)
        (model(pixel_values=x[rows]).logits - target[rows]).square().sum().backward()
    for n, p in trainable.items():
        assert p.grad is not None and p.grad.abs().max() > 0, n
        torch.testing.assert_close(mixed[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)


def test_several_adapters_load_trainable_set_delete(tmp_path):
    base = build("upernet_swin")
    get_peft_model(copy.deepcopy(base), VisualPromptConfig(num_virtual_tokens=3, **KV)).save_pretrained(tmp_path / "a")
    model = PeftModel.from_pretrained(base, tmp_path / "a", adapter_name="A")
    assert not any(p.requires_grad for p in model.parameters())
    model.load_adapter(tmp_path / "a", adapter_name="B", is_trainable=True)
    model.set_adapter("B")
    assert all(p.requires_grad for p in prompt_params(model, "B"))
    model.add_adapter("C", VisualPromptConfig(num_virtual_tokens=5, **KV))
    assert len(prompt_params(model, "C")) == 6
    model.eval()
    x = pixels()
    with torch.no_grad():
        out_b = model(pixel_values=x).logits
        model.set_adapter("A")
        torch.testing.assert_close(model(pixel_values=x).logits, out_b)
    with pytest.raises(ValueError, match="same num_virtual_tokens"):
        model(pixel_values=x, adapter_names=["A", "C"])
    model.delete_adapter("C")
    assert prompt_params(model, "C") == [] and "C" not in model.peft_config


# --------------------------------------------------------------------------- errors
def test_errors_are_clear_and_come_before_any_change(tmp_path):
    with pytest.raises(ValueError, match="deep VPT only"):
        VisualPromptConfig(prompt_mode="key_value", deep=False)
    with pytest.raises(ValueError, match="prompt_mode must be"):
        VisualPromptConfig(prompt_mode="prefix")
    beit = T.BeitForSemanticSegmentation(T.BeitConfig(**VIT, out_indices=[0, 1, 2, 3], num_labels=3))
    with pytest.raises(ValueError, match="Key/value visual prompts do not support.*prompt_mode='tokens'"):
        get_peft_model(beit, VisualPromptConfig(**KV))
    assert all("forward" not in m.__dict__ for m in beit.modules())
    # Token-level prompts on SegFormer point to the key/value mode.
    with pytest.raises(ValueError, match="prompt_mode='key_value'"):
        get_peft_model(build("segformer"), VisualPromptConfig())
    # An adapter refuses a base of another architecture (here: another SegFormer width), before any change.
    get_peft_model(build("segformer"), VisualPromptConfig(**KV)).save_pretrained(tmp_path / "adapter")
    wrong = build("segformer", hidden_sizes=[8, 16, 16, 32])
    with pytest.raises(ValueError, match="another base architecture.*hidden_size"):
        PeftModel.from_pretrained(wrong, tmp_path / "adapter")
    assert not any("visual_prompt" in n for n, _ in wrong.named_modules())
    with pytest.raises(ValueError, match=r"no module of class \['SegformerLayer'\]"):
        PeftModel.from_pretrained(build("upernet_swin"), tmp_path / "adapter")
