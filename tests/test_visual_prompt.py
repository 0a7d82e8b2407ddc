"""The core tuner: VPT against a hand-written reference, peft API round trips, mixed batches, errors."""

import copy
import json
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
import transformers as T
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from peft.utils import PeftType

import peft_medseg
from peft_medseg import VisualPromptConfig
from peft_medseg.models import build_segmentation_model

STAGES = ["stage1", "stage2", "stage3", "stage4"]
VIT = dict(
    hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
)


def upernet(backbone_config, num_labels=3):
    return T.UperNetForSemanticSegmentation(
        T.UperNetConfig(
            backbone_config=backbone_config,
            hidden_size=16,
            auxiliary_in_channels=backbone_config.hidden_size,
            use_auxiliary_head=False,
            num_labels=num_labels,
        )
    )


def tiny_base(seed=0, **overrides):
    torch.manual_seed(seed)
    config = T.Dinov2Config(**{**VIT, **overrides}, out_features=STAGES, reshape_hidden_states=True)
    return upernet(config).eval()


def pixels(batch=2, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def prompt_params(model, adapter="default"):
    return [p for n, p in model.named_parameters() if "vpt_prompt" in n and n.endswith(f".{adapter}")]


# --------------------------------------------------------------------------- registration
def test_registration_is_idempotent_and_the_type_is_a_plain_string():
    peft_medseg.register_visual_prompt()
    peft_medseg.register_visual_prompt()
    assert PeftType.VISUAL_PROMPT == "VISUAL_PROMPT"
    assert hash(PeftType.VISUAL_PROMPT) == hash("VISUAL_PROMPT")
    assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING["VISUAL_PROMPT"] is VisualPromptConfig
    assert "VISUAL_PROMPT" in [member.value for member in PeftType]
    # A second import in a fresh interpreter registers once and works.
    code = "import peft_medseg, importlib; importlib.reload(peft_medseg); import peft_medseg; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_wrapping_and_loading_print_no_deprecation_warning_from_peft(tmp_path):
    # In fresh interpreters: pytest resets warning filters around collection, so only a fresh process shows what a
    # user sees. Control: plain peft (LoRA) on the same base prints transformers' notice, which peft 0.21 triggers by
    # reading the deprecated `is_gradient_checkpointing` (once transformers drops it, the control fails and the filter
    # in peft_medseg.visual_prompt can go). With `import peft_medseg`, wrapping, saving and loading print none of it.
    # The base is built inline: `tiny_base` of this module would import peft_medseg, and with it the filter.
    setup = textwrap.dedent(
        f"""
        import transformers as T
        from peft import LoraConfig, PeftModel, get_peft_model
        def tiny_base():
            backbone = T.Dinov2Config(**{VIT!r}, out_features={STAGES!r}, reshape_hidden_states=True)
            return T.UperNetForSemanticSegmentation(
                T.UperNetConfig(backbone_config=backbone, hidden_size=16, use_auxiliary_head=False, num_labels=3)
            )
        """
    )
    control = setup + "get_peft_model(tiny_base(), LoraConfig(target_modules=['q_proj']))"
    ours = setup + textwrap.dedent(
        f"""
        import peft_medseg
        get_peft_model(tiny_base(), peft_medseg.VisualPromptConfig(num_virtual_tokens=2)).save_pretrained({str(tmp_path)!r})
        PeftModel.from_pretrained(tiny_base(), {str(tmp_path)!r})
        """
    )
    for code, expected in ((control, True), (ours, False)):
        result = subprocess.run(
            [sys.executable, "-W", "always::FutureWarning", "-c", code], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        assert ("is_gradient_checkpointing" in result.stderr) is expected, result.stderr


# --------------------------------------------------------------------------- reference VPT
def reference_feature_maps(base, x, prompts, deep):
    """VPT written out by hand: embeddings, then each block on [CLS, prompts, patches], prompts dropped after."""
    backbone = base.backbone
    hidden = backbone.embeddings(x)
    num_prompts = prompts[0].shape[0]
    batch = x.shape[0]
    stage_states = [hidden]
    if not deep:
        hidden = torch.cat([hidden[:, :1], prompts[0].expand(batch, -1, -1), hidden[:, 1:]], dim=1)
    for i, block in enumerate(backbone.encoder.layer):
        if deep:
            hidden = torch.cat([hidden[:, :1], prompts[i].expand(batch, -1, -1), hidden[:, 1:]], dim=1)
            hidden = block(hidden)
            hidden = torch.cat([hidden[:, :1], hidden[:, 1 + num_prompts :]], dim=1)
            stage_states.append(hidden)
        else:
            hidden = block(hidden)
            stage_states.append(torch.cat([hidden[:, :1], hidden[:, 1 + num_prompts :]], dim=1))
    maps = []
    for stage, state in zip(backbone.stage_names, stage_states):
        if stage in backbone.out_features:
            state = backbone.layernorm(state)[:, 1:]
            side = x.shape[-1] // backbone.config.patch_size
            maps.append(state.reshape(batch, side, side, -1).permute(0, 3, 1, 2))
    return maps


@pytest.mark.parametrize("deep", [True, False])
def test_tuner_equals_hand_written_vpt(deep):
    base = tiny_base()
    reference_base = copy.deepcopy(base)
    config = VisualPromptConfig(num_virtual_tokens=5, deep=deep, prompt_dropout=0.0)
    model = get_peft_model(base, config).eval()
    prompts = [p.detach() for p in prompt_params(model)]
    assert len(prompts) == (4 if deep else 1)
    x = pixels()
    with torch.no_grad():
        maps = model.base_model.model.backbone(x).feature_maps
        expected = reference_feature_maps(reference_base, x, prompts, deep)
        logits = model(pixel_values=x).logits
        expected_logits = reference_base.decode_head(expected)
        expected_logits = torch.nn.functional.interpolate(
            expected_logits, size=x.shape[2:], mode="bilinear", align_corners=False
        )
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, expected_logits, atol=1e-6, rtol=1e-4)
    # And the prompts really change the features.
    with torch.no_grad():
        plain = reference_base.backbone(x).feature_maps
    assert min((got - ref).abs().max() for got, ref in zip(maps, plain)) > 1e-2


def test_vpt_init_range_and_resolved_config():
    model = get_peft_model(tiny_base(), VisualPromptConfig(num_virtual_tokens=7))
    config = model.peft_config["default"]
    bound = (6 / (3 * 8**2 + 32)) ** 0.5
    for p in prompt_params(model):
        assert p.shape == (7, 32)
        assert p.abs().max() <= bound and p.abs().max() > bound / 2
    assert (config.block_class, config.hidden_size, config.num_blocks) == ("Dinov2Layer", 32, 4)
    assert (config.num_prefix_tokens, config.patch_size, config.base_model_type) == (1, 8, "upernet")
    assert len(config.base_fingerprint) == 16


def test_hidden_state_capture_never_sees_prompts():
    model = get_peft_model(tiny_base(), VisualPromptConfig(num_virtual_tokens=6)).eval()
    out = model.base_model.model.backbone(pixels(), output_hidden_states=True)
    assert all(h.shape[1] == 1 + 16 for h in out.hidden_states)


# --------------------------------------------------------------------------- base untouched
def test_disable_and_unload_reproduce_base_exactly_and_training_never_changes_base():
    base = tiny_base()
    x = pixels(4)
    with torch.no_grad():
        expected = base(pixel_values=x).logits
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, VisualPromptConfig(num_virtual_tokens=4, modules_to_save=["decode_head.classifier"]))
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        loss = model(pixel_values=x).logits.square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        assert (model(pixel_values=x).logits - expected).abs().max() > 1e-4
        with model.disable_adapter():
            torch.testing.assert_close(model(pixel_values=x).logits, expected, atol=0, rtol=0)
    unloaded = model.unload()
    assert not any("visual_prompt" in n or "modules_to_save" in n for n, _ in unloaded.named_modules())
    assert all("forward" not in block.__dict__ for block in unloaded.backbone.encoder.layer)
    after = unloaded.state_dict()
    assert before.keys() == after.keys()
    for key in before:  # parameters and buffers (BatchNorm running stats included) bit-identical
        assert torch.equal(before[key], after[key]), key
    with torch.no_grad():
        torch.testing.assert_close(unloaded(pixel_values=x).logits, expected, atol=0, rtol=0)


def test_trainable_share_below_one_percent_on_vit_small():
    base = build_segmentation_model("small", num_labels=4, image_size=224)
    model = get_peft_model(base, VisualPromptConfig(num_virtual_tokens=10, deep=True))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 12 * 10 * 384
    assert trainable / total < 0.01


# --------------------------------------------------------------------------- save / load
LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch, transformers as T
    import peft_medseg
    from peft import PeftModel
    torch.manual_seed(0)
    config = T.UperNetConfig.from_pretrained(sys.argv[1])
    base = T.UperNetForSemanticSegmentation.from_pretrained(sys.argv[1]).eval()
    model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
    x = torch.load(sys.argv[3])
    with torch.no_grad():
        torch.save(model(pixel_values=x).logits, sys.argv[4])
    """
)


@pytest.mark.parametrize("deep", [True, False])
def test_save_and_load_in_a_fresh_process_gives_identical_logits(tmp_path, deep):
    base = tiny_base()
    base.save_pretrained(tmp_path / "base")
    config = VisualPromptConfig(num_virtual_tokens=3, deep=deep, modules_to_save=["decode_head.classifier"])
    model = get_peft_model(base, config)
    with torch.no_grad():  # make the head copy differ from the base so that saving it matters
        model.base_model.model.decode_head.classifier.modules_to_save["default"].weight.add_(0.1)
    model.eval()
    model.save_pretrained(tmp_path / "center-B")
    files = sorted(p.name for p in (tmp_path / "center-B").iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    saved = json.loads((tmp_path / "center-B" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "VISUAL_PROMPT" and saved["block_class"] == "Dinov2Layer"
    from safetensors.torch import load_file

    keys = sorted(load_file(tmp_path / "center-B" / "adapter_model.safetensors"))
    assert all("vpt_prompt" in k or "decode_head.classifier" in k for k in keys), keys
    assert len(keys) == (4 if deep else 1) + 2
    x = pixels()
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    args = [str(tmp_path / "base"), str(tmp_path / "center-B"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")]
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, atol=0, rtol=0)


def test_load_adapter_trainable_add_set_delete(tmp_path):
    base = tiny_base()
    get_peft_model(copy.deepcopy(base), VisualPromptConfig(num_virtual_tokens=3)).save_pretrained(tmp_path / "a")
    model = PeftModel.from_pretrained(base, tmp_path / "a", adapter_name="A")
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference by default
    model.load_adapter(tmp_path / "a", adapter_name="B", is_trainable=True)
    assert all(p.requires_grad is False for p in prompt_params(model, "A"))
    model.set_adapter("B")
    assert all(p.requires_grad for p in prompt_params(model, "B"))
    model.add_adapter("C", VisualPromptConfig(num_virtual_tokens=5))
    assert len(prompt_params(model, "C")) == 4
    x = pixels()
    model.eval()
    with torch.no_grad():
        out_b = model(pixel_values=x).logits
        model.set_adapter("A")
        torch.testing.assert_close(model(pixel_values=x).logits, out_b)  # same weights loaded twice
        model.set_adapter("C")
        assert (model(pixel_values=x).logits - out_b).abs().max() > 1e-5
    model.delete_adapter("C")
    assert prompt_params(model, "C") == [] and "C" not in model.peft_config


def test_inject_adapter_in_model_and_transformers_load_adapter(tmp_path):
    base = tiny_base()
    model = inject_adapter_in_model(VisualPromptConfig(num_virtual_tokens=2), copy.deepcopy(base))
    assert len(prompt_params(model)) == 4
    peft_model = get_peft_model(copy.deepcopy(base), VisualPromptConfig(num_virtual_tokens=2)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    x = pixels()
    with torch.no_grad():
        expected = peft_model(pixel_values=x).logits
    base.load_adapter(str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(base(pixel_values=x).logits, expected)


# --------------------------------------------------------------------------- mixed batches
HEAD_NORMS = ["decode_head.fpn_bottleneck.batch_norm", "decode_head.lateral_convs.0.batch_norm"]


def three_centers(deep=True, with_head=True, head_norms=False):
    base = tiny_base()
    kwargs = dict(num_virtual_tokens=4, deep=deep, prompt_dropout=0.0)
    if with_head:
        kwargs["modules_to_save"] = ["decode_head.classifier"] + (HEAD_NORMS if head_norms else [])
    model = get_peft_model(base, VisualPromptConfig(**kwargs), adapter_name="A")
    for name, seed in (("B", 1), ("C", 2)):
        torch.manual_seed(seed)
        model.add_adapter(name, VisualPromptConfig(**kwargs))
    with torch.no_grad():  # distinct heads per center, so routing the head matters
        for i, name in enumerate("ABC"):
            model.base_model.model.decode_head.classifier.modules_to_save[name].weight.add_(0.05 * (i + 1))
    return model


@pytest.mark.parametrize("deep, head_norms", [(True, False), (False, False), (True, True)])
def test_mixed_batch_equals_per_sample_set_adapter(deep, head_norms):
    model = three_centers(deep, head_norms=head_norms).eval()
    if head_norms:  # per-center statistics, so that routing them matters
        with torch.no_grad():
            for i, name in enumerate("ABC"):
                for norm in HEAD_NORMS:
                    model.base_model.model.get_submodule(norm).modules_to_save[name].running_mean.add_(0.3 * (i + 1))
    assert_mixed_batch_equals_per_sample_passes(model, ["A", "C", "__base__", "B", "A", "__base__"])


def assert_mixed_batch_equals_per_sample_passes(model, names):
    """One mixed-center batch gives each sample the logits of its own pass with its adapter (or the base)."""
    x = pixels(len(names))
    with torch.no_grad():
        mixed = model(pixel_values=x, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    single = model(pixel_values=x[i : i + 1]).logits
            else:
                model.set_adapter(name)
                single = model(pixel_values=x[i : i + 1]).logits
            torch.testing.assert_close(mixed[i : i + 1], single, atol=1e-5, rtol=0)


@pytest.mark.parametrize("deep, head_norms", [(True, False), (False, False), (True, True)])
def test_mixed_batch_training_gives_the_gradients_of_separate_passes(deep, head_norms):
    model = three_centers(deep, head_norms=head_norms)
    model.train()
    model.base_model.set_requires_grad(["A", "B", "C"], True)
    names = ["A", "B", "C", "A", "__base__", "B"]
    x = pixels(len(names))
    target = torch.randn(len(names), 3, 32, 32, generator=torch.Generator().manual_seed(3))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(".A" in n for n in trainable) and any(".C" in n for n in trainable)

    (model(pixel_values=x, adapter_names=names).logits - target).square().sum().backward()
    mixed = {n: p.grad.clone() for n, p in trainable.items()}
    model.zero_grad()
    for center in ["A", "B", "C"]:
        rows = [i for i, n in enumerate(names) if n == center]
        model.set_adapter(center)
        model.base_model.set_requires_grad(["A", "B", "C"], True)
        (model(pixel_values=x[rows]).logits - target[rows]).square().sum().backward()
    for n, p in trainable.items():
        assert p.grad is not None and p.grad.abs().max() > 0, n
        torch.testing.assert_close(mixed[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)


def test_mixed_batch_errors():
    model = three_centers().eval()
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['Z'\]"):
        model(pixel_values=pixels(2), adapter_names=["A", "Z"])
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        model(pixel_values=pixels(2), adapter_names=["A", "B", "C"])


@pytest.mark.parametrize("deep", [True, False])
def test_gradient_checkpointing_gives_equal_gradients(deep):
    grads = []
    for checkpointing in (False, True):
        base = tiny_base()
        if checkpointing:
            base.backbone.activation_checkpointing_enable()
        torch.manual_seed(0)
        model = get_peft_model(base, VisualPromptConfig(num_virtual_tokens=3, deep=deep, prompt_dropout=0.0))
        model.train()
        model(pixel_values=pixels(4)).logits.square().mean().backward()
        grads.append([p.grad.clone() for p in prompt_params(model)])
    assert base.backbone.encoder.layer[0].gradient_checkpointing
    for a, b in zip(*grads):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_prompt_dropout_only_in_training():
    model = get_peft_model(tiny_base(), VisualPromptConfig(num_virtual_tokens=4, prompt_dropout=0.5))
    x = pixels()
    model.eval()
    with torch.no_grad():
        a, b = model(pixel_values=x).logits, model(pixel_values=x).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    model.train()
    model.base_model.model.decode_head.eval()  # isolate the prompts' randomness from BatchNorm batch statistics
    with torch.no_grad():
        c, d = model(pixel_values=x).logits, model(pixel_values=x).logits
    assert (c - d).abs().max() > 1e-6


# --------------------------------------------------------------------------- architectures
ARCHITECTURES = {
    "dinov2_registers": lambda: upernet(
        T.Dinov2WithRegistersConfig(**VIT, num_register_tokens=2, out_features=STAGES, reshape_hidden_states=True)
    ),
    "dinov3": lambda: upernet(T.DINOv3ViTConfig(**VIT, num_register_tokens=2, out_features=STAGES)),
    "dpt": lambda: T.DPTForSemanticSegmentation(
        T.DPTConfig(
            **VIT,
            backbone_out_indices=[0, 1, 2, 3],
            neck_hidden_sizes=[16, 16, 16, 16],
            fusion_hidden_size=16,
            use_auxiliary_head=False,
            num_labels=3,
        )
    ),
    "beit": lambda: T.BeitForSemanticSegmentation(
        T.BeitConfig(
            **VIT,
            use_relative_position_bias=True,
            out_indices=[0, 1, 2, 3],
            use_auxiliary_head=False,
            num_labels=3,
            pool_scales=[1, 2],
        )
    ),
    "upernet_beit_shared_bias": lambda: upernet(
        T.BeitConfig(**VIT, use_shared_relative_position_bias=True, out_features=STAGES)
    ),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("deep", [True, False])
def test_supported_architectures_forward_backward(name, deep):
    torch.manual_seed(0)
    base = ARCHITECTURES[name]().eval()
    x = pixels()
    with torch.no_grad():
        expected = base(pixel_values=x).logits
    model = get_peft_model(base, VisualPromptConfig(num_virtual_tokens=3, deep=deep))
    model.train()
    logits = model(pixel_values=x).logits
    assert logits.shape == expected.shape
    logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompt_params(model))
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(pixel_values=x).logits, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "build",
    [
        lambda: T.SegformerForSemanticSegmentation(
            T.SegformerConfig(num_labels=3, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], decoder_hidden_size=16)
        ),
        lambda: upernet(
            T.SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], image_size=32, out_features=STAGES)
        ),
    ],
    ids=["segformer", "upernet_swin"],
)
def test_unsupported_architectures_get_a_clear_error_before_any_change(build):
    base = build()
    before = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match="does not support .*Supported models.*LoraConfig"):
        get_peft_model(base, VisualPromptConfig())
    assert [n for n, _ in base.named_modules()] == before
    assert all("forward" not in m.__dict__ for m in base.modules())


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "other, field",
    [
        (dict(hidden_size=48, num_attention_heads=2), "hidden_size"),
        (dict(num_hidden_layers=8), "num_blocks"),
        (dict(mlp_ratio=3), "base_fingerprint"),
    ],
)
def test_loading_onto_another_architecture_fails_before_anything_changes(tmp_path, other, field):
    get_peft_model(tiny_base(), VisualPromptConfig(num_virtual_tokens=2)).save_pretrained(tmp_path / "adapter")
    wrong = tiny_base(**other)
    with pytest.raises(ValueError, match=f"another base architecture.*{field}"):
        PeftModel.from_pretrained(wrong, tmp_path / "adapter")
    assert not any("visual_prompt" in n for n, _ in wrong.named_modules())
    assert all("forward" not in m.__dict__ for m in wrong.modules())


def test_other_base_checkpoint_warns_and_strict_check_refuses(tmp_path):
    base = tiny_base()
    base.save_pretrained(tmp_path / "base-A")
    base_a = T.UperNetForSemanticSegmentation.from_pretrained(tmp_path / "base-A")
    get_peft_model(base_a, VisualPromptConfig(num_virtual_tokens=2)).save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    tiny_base(seed=5).save_pretrained(tmp_path / "base-B")
    base_b = T.UperNetForSemanticSegmentation.from_pretrained(tmp_path / "base-B")
    with pytest.warns(UserWarning, match="trained on base .*base-A.*loaded onto .*base-B"):
        PeftModel.from_pretrained(base_b, tmp_path / "adapter")
    config = VisualPromptConfig.from_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="trained on base"):
        peft_medseg.check_base_compatible(base_b, config, strict=True)


def test_missing_and_corrupt_adapter_files_fail_before_anything_changes(tmp_path):
    get_peft_model(tiny_base(), VisualPromptConfig(num_virtual_tokens=2)).save_pretrained(tmp_path / "adapter")
    folder = str(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    base = tiny_base()
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_model.safetensors: missing"):
        PeftModel.from_pretrained(base, folder)
    for corrupt in (data[: len(data) // 2], b"garbage"):
        weights.write_bytes(corrupt)
        with pytest.raises(ValueError, match=r"adapter_model.safetensors: not a readable safetensors file"):
            PeftModel.from_pretrained(base, folder)
    assert not any("visual_prompt" in n for n, _ in base.named_modules())
    # Weights that do not fit the config (other token count) are refused, not silently left random.
    get_peft_model(tiny_base(), VisualPromptConfig(num_virtual_tokens=5)).save_pretrained(tmp_path / "five")
    weights.write_bytes((tmp_path / "five" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"do not fit its config: shape"):
        PeftModel.from_pretrained(tiny_base(), folder)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_virtual_tokens=0), "num_virtual_tokens"),
        (dict(prompt_init="xavier"), "prompt_init"),
        (dict(prompt_dropout=1.0), "prompt_dropout"),
        (dict(deep=False, layers=[0, 2]), "single block index"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VisualPromptConfig(**kwargs)


def test_layers_out_of_range_and_merge_refused():
    with pytest.raises(ValueError, match=r"layers=\[0, 9\]: \[9\] outside 0..3"):
        get_peft_model(tiny_base(), VisualPromptConfig(layers=[0, 9]))
    model = get_peft_model(tiny_base(), VisualPromptConfig(layers=[1, 3]))
    assert len(prompt_params(model)) == 2
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
