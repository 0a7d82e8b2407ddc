"""The tuner on MONAI's 3D UNETR and Swin UNETR: hand-written VPT reference, peft round trips, mixed batches."""

import subprocess
import sys
import textwrap

import pytest
import torch
from monai.networks.nets import UNETR
from peft import PeftModel, get_peft_model

import peft_medseg  # noqa: F401  (registers the method)
from peft_medseg import VisualPromptConfig
from peft_medseg.models3d import UNETR3D, build_volume_model, load_volume_model

UNETR_TINY = dict(in_channels=2, out_channels=3, img_size=(32, 32, 32), feature_size=4, hidden_size=32, mlp_dim=64)
SWIN_TINY = dict(architecture="SwinUNETR", feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))


def unetr(seed=0, plain=False, **overrides):
    torch.manual_seed(seed)
    model_class = UNETR if plain else UNETR3D
    return model_class(**{**UNETR_TINY, "num_heads": 2, **overrides}).eval()


def volumes(batch=2, size=32, seed=1):
    return torch.randn(batch, 2, size, size, size, generator=torch.Generator().manual_seed(seed))


def reference_unetr_forward(model, x, prompts, deep):
    """UNETR's forward written out: patch embedding, blocks with prompts concatenated by hand (deep: fresh prompts
    per block, outputs dropped; shallow: inserted once and carried), hidden states without prompts, then the
    decoder exactly as MONAI's UNETR.forward."""
    vit = model.vit
    tokens = vit.patch_embedding(x)
    num_patches = tokens.shape[1]
    hidden_states = []
    carried = None
    for i, block in enumerate(vit.blocks):
        if deep:
            inserted = prompts[i].expand(x.shape[0], -1, -1)
        else:
            inserted = prompts[0].expand(x.shape[0], -1, -1) if i == 0 else carried
        out = type(block).forward(block, torch.cat([inserted, tokens], dim=1))
        carried, tokens = out[:, :-num_patches], out[:, -num_patches:]
        hidden_states.append(tokens)
    tokens = vit.norm(tokens)
    enc1 = model.encoder1(x)
    enc2 = model.encoder2(model.proj_feat(hidden_states[3]))
    enc3 = model.encoder3(model.proj_feat(hidden_states[6]))
    enc4 = model.encoder4(model.proj_feat(hidden_states[9]))
    dec4 = model.proj_feat(tokens)
    dec3 = model.decoder5(dec4, enc4)
    dec2 = model.decoder4(dec3, enc3)
    dec1 = model.decoder3(dec2, enc2)
    out = model.decoder2(dec1, enc1)
    return model.out(out)


@pytest.mark.parametrize("deep", [True, False])
def test_tuner_equals_hand_written_vpt_on_unetr(deep):
    base = unetr()
    x = volumes()
    model = get_peft_model(base, VisualPromptConfig(num_virtual_tokens=5, deep=deep, prompt_dropout=0.0)).eval()
    prompts = [p for n, p in model.named_parameters() if "vpt_prompt" in n]
    assert len(prompts) == (12 if deep else 1)
    with torch.no_grad():
        for p in prompts:
            p.normal_()  # far from the small init, so a prompt that went missing would show
        expected = reference_unetr_forward(model.get_base_model(), x, prompts, deep)
        actual = model(x)
        with model.disable_adapter():
            plain = model(x)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert (actual - plain).abs().max() > 1e-3
    config = model.peft_config["default"]
    assert (config.block_class, config.hidden_size, config.patch_size, config.num_prefix_tokens) == (
        "TransformerBlock",
        32,
        16,
        0,
    )
    assert (config.num_labels, config.base_model_type) == (3, "UNETR")


def test_unetr_save_reload_in_a_fresh_process_and_onto_plain_monai(tmp_path):
    base = unetr()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, VisualPromptConfig(num_virtual_tokens=4, modules_to_save=["out.conv.conv"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    model.eval()
    x = volumes()
    expected = model(x).detach()
    model.save_pretrained(tmp_path / "center-B")
    torch.save(x, tmp_path / "x.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = tmp_path / "check.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import torch, peft_medseg
            from peft import PeftModel
            from monai.networks.nets import UNETR
            from peft_medseg.models3d import load_volume_model
            x = torch.load({str(tmp_path / "x.pt")!r}); expected = torch.load({str(tmp_path / "expected.pt")!r})
            base = load_volume_model({str(tmp_path / "base")!r})
            model = PeftModel.from_pretrained(base, {str(tmp_path / "center-B")!r}).eval()
            assert torch.equal(model(x), expected), (model(x) - expected).abs().max()
            # The same adapter onto a plain MONAI UNETR with the same weights.
            plain = UNETR(**{UNETR_TINY!r}, num_heads=2)
            plain.load_state_dict(load_volume_model({str(tmp_path / "base")!r}).state_dict())
            model = PeftModel.from_pretrained(plain.eval(), {str(tmp_path / "center-B")!r}).eval()
            assert torch.equal(model(x), expected)
            print("ok")
            """
        )
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_unetr_mixed_batch_equals_per_sample_and_base_rows_are_the_base():
    base = unetr()
    x = volumes(batch=3)
    with torch.no_grad():
        reference = base(x)
    model = get_peft_model(
        base, VisualPromptConfig(num_virtual_tokens=4, head_rank=2, modules_to_save=["out.conv.conv"])
    )
    model.add_adapter("b", VisualPromptConfig(num_virtual_tokens=4, head_rank=2, modules_to_save=["out.conv.conv"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vpt_" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.5)
    model.eval()
    with torch.no_grad():
        mixed = model(x, adapter_names=["default", "b", "__base__"])
        model.set_adapter("default")
        a = model(x[:1])
        model.set_adapter("b")
        b = model(x[1:2])
    torch.testing.assert_close(mixed[0:1], a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1:2], b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2:3], reference[2:3], atol=1e-5, rtol=1e-5)


def test_training_unetr_prompts_leaves_the_base_bit_identical_and_unload_restores_it():
    base = unetr()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    x = volumes()
    with torch.no_grad():
        reference = base(x)
    model = get_peft_model(base, VisualPromptConfig(num_virtual_tokens=4, head_rank=2))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("vpt_" in n for n in trained)
    restored = model.unload().eval()
    assert set(restored.state_dict()) == set(before)
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(restored(x), reference)


def test_adapter_for_another_unetr_is_refused_before_anything_changes(tmp_path):
    model = get_peft_model(unetr(), VisualPromptConfig(num_virtual_tokens=4))
    model.save_pretrained(tmp_path / "center")
    other = unetr(hidden_size=48, mlp_dim=96)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="hidden_size: adapter 32 vs base 48"):
        PeftModel.from_pretrained(other, tmp_path / "center")
    assert set(other.state_dict()) == set(before)
    assert not any(hasattr(m, "visual_prompt") for m in other.modules())


def test_volume_base_round_trip_and_named_configs(tmp_path):
    base = build_volume_model("unetr-tiny", num_labels=3)
    assert isinstance(base, UNETR3D) and base.vit.patch_embedding.n_patches == 64
    base.save_pretrained(tmp_path / "base")
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "base").iterdir()}
    loaded = load_volume_model(tmp_path / "base")
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), loaded.state_dict().values()))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"not_an_argument": 1}')
    with pytest.raises(ValueError, match="fits none"):
        load_volume_model(tmp_path / "bad")


# --------------------------------------------------------------------------- Swin UNETR: key/value prompts
def swin_unetr(seed=0):
    torch.manual_seed(seed)
    return build_volume_model(SWIN_TINY, num_labels=3).eval()


def test_swin_unetr_window_attention_with_prompts_equals_monai_attention_over_appended_tokens():
    """Where MONAI's own WindowAttention can take the prompts as tokens (zero position bias, no mask, a small
    window), its outputs for the patch tokens must equal the key/value prompt path."""
    model = get_peft_model(swin_unetr(), VisualPromptConfig(num_virtual_tokens=3, prompt_mode="key_value"))
    block = model.get_base_model().swinViT.layers1[0].blocks[0]
    attention = block.attn
    with torch.no_grad():
        attention.relative_position_bias_table.zero_()
        prompts = attention.visual_prompt.vpt_prompt["default"].normal_()
    model.eval()
    windows = torch.randn(4, 27, attention.qkv.in_features)  # 4 windows of 3³ tokens
    with torch.no_grad():
        actual = attention(windows, mask=None)
        tokens = torch.cat([windows, block.norm1(prompts).expand(4, -1, -1)], dim=1)
        expected = type(attention).forward(attention, tokens, mask=None)[:, :27]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_swin_unetr_key_value_prompts_train_mix_and_round_trip(tmp_path):
    base = swin_unetr()
    x = volumes(batch=2, size=64)
    with torch.no_grad():
        reference = base(x)
    config = VisualPromptConfig(num_virtual_tokens=4, prompt_mode="key_value", prompt_dropout=0.0)
    model = get_peft_model(base, config)
    model.train()
    model(x).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    model.add_adapter("b", VisualPromptConfig(num_virtual_tokens=4, prompt_mode="key_value"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".vpt_prompt.b" in name:
                p.normal_()
    model.eval()
    with torch.no_grad():
        mixed = model(x, adapter_names=["__base__", "b"])
        model.set_adapter("b")
        alone = model(x[1:])
    torch.testing.assert_close(mixed[:1], reference[:1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1:], alone, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "centers")
    again = PeftModel.from_pretrained(swin_unetr(), tmp_path / "centers" / "b").eval()
    with torch.no_grad():
        assert torch.equal(again(x[1:]), alone)
    saved = model.peft_config["b"]
    assert (saved.block_class, saved.base_model_type, saved.patch_size) == ("SwinTransformerBlock", "SwinUNETR", 2)


def test_token_prompts_on_swin_unetr_point_to_key_value_mode():
    with pytest.raises(ValueError, match="key_value"):
        get_peft_model(swin_unetr(), VisualPromptConfig(num_virtual_tokens=4))


# --------------------------------------------------------------------------- activation checkpointing
def adapted_for_checkpointing(kind, seed=0):
    """Two trainable center adapters with head norms, head and MLP updates (the default method's parts) on a tiny UNETR
    (deep or shallow token prompts) or Swin UNETR (key/value prompts), or with a copy of the whole decoder
    (`vpt-deep-decoder`) on UNETR, every adapter weight moved off its init."""
    from peft_medseg.training import decoder_modules, head_norm_modules

    base = swin_unetr(seed) if kind == "swin" else unetr(seed, norm_name=("instance", {"affine": True}))
    saved = ["out.conv.conv", *head_norm_modules(base)]
    mode = dict(prompt_mode="key_value") if kind == "swin" else dict(deep=kind != "shallow")
    config = dict(num_virtual_tokens=3, head_rank=2, mlp_rank=1, prompt_dropout=0.0, modules_to_save=saved, **mode)
    if kind == "decoder":
        config.update(head_rank=0, mlp_rank=0, modules_to_save=decoder_modules(base))
    model = get_peft_model(base, VisualPromptConfig(**config))
    model.add_adapter("b", VisualPromptConfig(**config))
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vpt_" in name or "modules_to_save" in name:
                p.requires_grad_(True)
                p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return model.train()


@pytest.mark.parametrize("kind", ["deep", "shallow", "swin", "decoder"])
def test_activation_checkpointing_gives_the_same_gradients_on_a_mixed_batch_and_keeps_less(kind):
    from peft_medseg.training import enable_gradient_checkpointing

    size = 64 if kind == "swin" else 32
    x = volumes(batch=3, size=size)
    names = ["default", "b", "__base__"]
    weights = torch.randn(3, 3, size, size, size, generator=torch.Generator().manual_seed(3))

    def step(model):
        """Gradients of every trainable tensor and the bytes autograd kept outside checkpoints."""
        kept = []

        def pack(tensor):
            kept.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = (model(x, adapter_names=names) * weights).sum()
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, sum(kept)

    plain_grads, plain_bytes = step(adapted_for_checkpointing(kind))
    model = adapted_for_checkpointing(kind)
    checkpointed = enable_gradient_checkpointing(model)
    assert any(name.startswith(("vit.", "swinViT.")) for name in checkpointed)
    decoder2 = ["decoder2.original_module", "decoder2.modules_to_save.default", "decoder2.modules_to_save.b"]
    assert set(decoder2) <= set(checkpointed) if kind == "decoder" else "decoder2" in checkpointed
    grads, kept_bytes = step(model)
    assert set(grads) == set(plain_grads)
    # Every center's prompts, head and MLP updates and norm copies get a gradient, each as without checkpointing.
    assert kind == "decoder" or any(".mlp_update.vpt_up.b" in name for name in grads)
    assert all(g is not None and g.abs().sum() > 0 for g in plain_grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert kept_bytes < 0.5 * plain_bytes


# --------------------------------------------------------------------------- routing volumes
def test_volume_signatures_route_each_center_reject_a_stranger_and_refuse_another_base(tmp_path):
    """Two centers whose volumes differ in contrast: the base's features of a volume's central patch route new
    volumes to their center, a volume unlike both goes to the base, and a signature meets only its own base."""
    from peft_medseg.routing import CenterRouter, CenterSignature, compute_signature, volume_routing_input

    model = unetr()
    generator = torch.Generator().manual_seed(5)

    def scans(center, count):
        """Preprocessed volumes (C, D, H, W) larger than the model's 32³ patch, of one center's contrast."""
        scale, offset = {"a": (1.0, 0.0), "b": (0.3, 2.0), "stranger": (4.0, -6.0)}[center]
        return [offset + scale * torch.randn(2, 40, 36, 34, generator=generator) for _ in range(count)]

    def patches(volumes):
        return [volume_routing_input(model, volume) for volume in volumes]

    signatures = {}
    for center in ("a", "b"):
        signature = compute_signature(model, center, patches(scans(center, 12)), patches(scans(center, 6)))
        assert signature.image_size == (32, 32, 32) and signature.num_channels == 2
        signature.save(tmp_path)
        signatures[center] = CenterSignature.load(tmp_path / "center_signature.safetensors")
    router = CenterRouter(signatures)
    router.check_base(model)
    new = patches(scans("a", 3) + scans("b", 3) + scans("stranger", 2))
    routes = router.route(model, torch.cat(new))
    assert routes.nearest[:6] == ["a"] * 3 + ["b"] * 3
    # Thresholds keep about 95% of a center's own volumes (a calibrated distance up to 1); strangers lie far out.
    assert sum(distance <= 1 for distance in routes.calibrated[:6]) >= 5
    assert routes.adapter_names[6:] == ["__base__"] * 2 and min(routes.calibrated[6:]) > 2
    with pytest.raises(ValueError, match="another base model"):
        router.check_base(unetr(seed=1))
