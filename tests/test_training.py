"""Training: methods, frozen norms, loss, two-step runs that save and load back, and exact mid-epoch resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from peft_medseg.models import build_image_processor, build_segmentation_model
from peft_medseg.training import (
    METHODS,
    PEFT_METHODS,
    TrainingConfig,
    eval_transform,
    latest_checkpoint,
    load_finetuned,
    load_multicenter_dataset,
    make_accelerator,
    prepare_model,
    save_finetuned,
    segmentation_loss,
    set_train_mode,
    split_validation,
    train_segmentation,
    train_transform,
)

NUM_LABELS = 3
IMAGE_SIZE = 32


def make_folder_dataset(root, centers=("A", "B", "C"), images_per_center=10, size=IMAGE_SIZE, seed=0) -> Path:
    """A tiny folder dataset: discs (label 1) and squares (label 2) on noise, an intensity profile per center."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for c_index, center in enumerate(centers):
        (root / center / "images").mkdir(parents=True)
        (root / center / "masks").mkdir(parents=True)
        for i in range(images_per_center):
            labels = np.zeros((size, size), np.uint8)
            cy, cx = rng.integers(8, size - 8, 2)
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= int(rng.integers(3, 7)) ** 2] = 1
            sy, sx = rng.integers(0, size - 8, 2)
            labels[sy : sy + 6, sx : sx + 6] = 2
            signal = np.array([30, 200, 120]) if c_index % 2 == 0 else np.array([200, 60, 120])
            image = signal[labels] + rng.normal(0, 10 + 10 * c_index, (size, size))
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / center / "images" / f"{i:03d}.png")
            Image.fromarray(labels).save(root / center / "masks" / f"{i:03d}.png")
    return root


def tiny_base(seed: int = 0):
    torch.manual_seed(seed)
    return build_segmentation_model("tiny", NUM_LABELS, image_size=IMAGE_SIZE).eval()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = make_folder_dataset(tmp_path_factory.mktemp("data") / "folder")
    data, id2label = load_multicenter_dataset(str(root))
    return data, id2label


def center_split(data, center="A", augment=True, seed=0):
    processor = build_image_processor(IMAGE_SIZE)
    rows = data["train"].filter(lambda c: c == center, input_columns="center")
    train, validation = split_validation(rows, 0.25)
    train.set_transform(train_transform(processor, seed) if augment else eval_transform(processor))
    validation.set_transform(eval_transform(processor))
    return train, validation, processor


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", METHODS)
def test_prepare_model_trains_exactly_the_method_parameters(method):
    model = prepare_model(tiny_base(), method, num_virtual_tokens=3)
    names = trainable_names(model)
    assert names
    if method == "vpt-deep-norms":
        assert all("vpt_prompt" in n or ".modules_to_save." in n for n in names)
        assert any("batch_norm.modules_to_save" in n for n in names)
    elif method == "vpt-deep-head":
        assert all(
            "vpt_prompt" in n or ".modules_to_save." in n or ".head_update.vpt_" in n or ".mlp_update.vpt_" in n
            for n in names
        )
        assert any("batch_norm.modules_to_save" in n for n in names)
        # A rank-1 update of every encoder block's MLP output projection.
        assert {n.split(".mlp_update.")[0] for n in names if ".mlp_update." in n} == {
            f"base_model.model.backbone.encoder.layer.{i}.mlp.fc2" for i in range(4)
        }
        assert {n.split(".head_update.")[0] for n in names if ".head_update." in n} == {
            n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d) and ".decode_head." in n and "classifier" not in n and "vpt_" not in n
            and "modules_to_save" not in n and "original_module" not in n
        }  # fmt: skip
        # In 2D each updated conv also has its depthwise 3x3 filter, except the pyramid-pooling branches.
        assert {n.split(".head_update.")[0] for n in names if ".vpt_depthwise." in n} == {
            n.split(".head_update.")[0] for n in names if ".head_update.vpt_down." in n and ".psp_modules." not in n
        }
    elif method == "vpt-deep-decoder":
        assert all("vpt_prompt" in n or n.startswith("base_model.model.decode_head.modules_to_save.") for n in names)
        head = sum(p.numel() for p in tiny_base().decode_head.parameters())
        assert sum(p.numel() for n, p in model.named_parameters() if n in names and "vpt_prompt" not in n) == head
    elif method.startswith("vpt"):
        assert all("vpt_prompt" in n or "classifier.modules_to_save" in n for n in names)
        assert any("vpt_prompt" in n for n in names) and any("classifier" in n for n in names)
    elif method == "lora":
        assert all("lora_" in n or "classifier.modules_to_save" in n for n in names)
        assert {n.split(".attention.")[1].split(".")[0] for n in names if "lora_" in n} == {
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
        }
    elif method == "decoder":
        assert all(n.startswith("decode_head.") for n in names) and len(names) > 4
    elif method == "classifier":
        assert names == {"decode_head.classifier.weight", "decode_head.classifier.bias"}
    else:
        assert names == {n for n, _ in model.named_parameters()}


def test_unknown_method_and_prompts_only():
    with pytest.raises(ValueError, match="Unknown method"):
        prepare_model(tiny_base(), "adapters")
    names = trainable_names(prepare_model(tiny_base(), "vpt-deep", train_classifier=False))
    assert names and all("vpt_prompt" in n for n in names)


@pytest.mark.parametrize("method", ["lora", "classifier", "decoder"])
def test_frozen_batchnorm_statistics_never_update(method):
    model = prepare_model(tiny_base(), method)
    head = model.get_base_model().decode_head if hasattr(model, "get_base_model") else model.decode_head
    before = head.bottleneck.batch_norm.running_mean.clone()
    set_train_mode(model)
    model(pixel_values=torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    changed = not torch.equal(before, head.bottleneck.batch_norm.running_mean)
    # The decode head trains under `decoder`, so its statistics should follow the new center; otherwise frozen.
    assert changed == (method == "decoder")


def test_loss_is_the_mean_of_the_losses_of_the_batch_halves_and_small_when_right():
    torch.manual_seed(0)
    logits = torch.randn(4, NUM_LABELS, 8, 8)
    labels = torch.randint(0, NUM_LABELS, (4, 8, 8))
    whole = segmentation_loss(logits, labels)
    halves = (segmentation_loss(logits[:2], labels[:2]) + segmentation_loss(logits[2:], labels[2:])) / 2
    torch.testing.assert_close(whole, halves)
    perfect = torch.nn.functional.one_hot(labels, NUM_LABELS).permute(0, 3, 1, 2).float() * 50
    assert segmentation_loss(perfect, labels) < 0.01 < whole


def reference_loss(logits, labels, dice_weight=1.0, ignore_index=255, smooth=1.0):
    """Cross-entropy + soft Dice written out by hand: per sample, foreground classes, ignored pixels left out."""
    cross_entropy = torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index)
    valid = (labels != ignore_index).unsqueeze(1).float()
    probabilities = logits.softmax(dim=1) * valid
    one_hot = torch.nn.functional.one_hot(labels.clamp(0, logits.shape[1] - 1), logits.shape[1])
    one_hot = one_hot.permute(0, 3, 1, 2).float() * valid
    intersection = (probabilities * one_hot).sum(dim=(2, 3))
    dice = (2 * intersection + smooth) / (probabilities.sum(dim=(2, 3)) + one_hot.sum(dim=(2, 3)) + smooth)
    return cross_entropy + dice_weight * (1.0 - dice[:, 1:].mean())


@pytest.mark.parametrize("dice_weight", [1.0, 0.5])
def test_loss_equals_a_hand_written_dice_plus_cross_entropy_with_ignored_pixels(dice_weight):
    torch.manual_seed(0)
    logits = torch.randn(3, NUM_LABELS, 8, 8, requires_grad=True)
    labels = torch.randint(0, NUM_LABELS, (3, 8, 8))
    labels[0, :2] = 255  # ignored pixels count in neither term
    got = segmentation_loss(logits, labels, dice_weight=dice_weight)
    want = reference_loss(logits, labels, dice_weight=dice_weight)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    (grad,) = torch.autograd.grad(got, logits)
    (want_grad,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(grad, want_grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_two_step_run_saves_and_loads_back(tiny_data, tmp_path, method):
    data, _ = tiny_data
    train, validation, processor = center_split(data)
    base_dir = tmp_path / "base"
    tiny_base().save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    model = prepare_model(tiny_base(), method, num_virtual_tokens=3)
    config = TrainingConfig(learning_rate=1e-2, num_epochs=1, batch_size=4, max_train_steps=2)
    accelerator = make_accelerator()
    result = train_segmentation(model, train, validation, NUM_LABELS, config, accelerator)
    assert result.completed_steps == 2
    model = set_train_mode(accelerator.unwrap_model(model), False)
    save_finetuned(model, tmp_path / "out", processor, {"center": "A"})

    out = tmp_path / "out"
    assert (out / "evaluation.json").is_file()
    is_adapter = method in PEFT_METHODS
    assert (out / "adapter_config.json").is_file() == is_adapter
    assert not list(tmp_path.glob(".out.tmp-*")), "the staging folder must be renamed away"
    loaded = load_finetuned(out, base_dir)
    if is_adapter:
        from peft import PeftModel

        assert isinstance(loaded, PeftModel)
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)
        # Training moved the model away from the base: what was saved is not just the base again.
        assert not torch.allclose(model(pixel_values=pixels).logits, tiny_base()(pixel_values=pixels).logits)


def test_every_epoch_draws_its_own_augmentations(tiny_data):
    """The loop moves the training transform to each epoch, so epoch 2 does not repeat epoch 1's augmented images."""
    data, _ = tiny_data
    train, validation, _ = center_split(data)
    transform = train.format["format_kwargs"]["transform"]
    epoch_one = [train[i]["pixel_values"] for i in range(2)]
    model = prepare_model(tiny_base(), "vpt-deep", num_virtual_tokens=3)
    config = TrainingConfig(learning_rate=1e-2, num_epochs=2, batch_size=4)
    train_segmentation(model, train, validation, NUM_LABELS, config, make_accelerator())
    assert transform.epoch == 1
    assert not any(torch.equal(a, train[i]["pixel_values"]) for i, a in enumerate(epoch_one))


def _run(data, checkpoint_dir, max_train_steps=None, resume=None, accumulation=1):
    train, validation, _ = center_split(data)
    model = prepare_model(tiny_base(), "vpt-deep", num_virtual_tokens=3)  # prompt dropout 0.1 stays on
    config = TrainingConfig(
        learning_rate=3e-2,
        num_epochs=2,
        batch_size=2,
        gradient_accumulation_steps=accumulation,
        checkpoint_dir=str(checkpoint_dir),
        checkpointing_steps=1,
        max_train_steps=max_train_steps,
        resume_from_checkpoint=resume,
    )
    accelerator = make_accelerator(gradient_accumulation_steps=accumulation)
    result = train_segmentation(model, train, validation, NUM_LABELS, config, accelerator)
    state = {n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    return result, state


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_mid_epoch_equals_an_uninterrupted_run(tiny_data, tmp_path, accumulation):
    data, _ = tiny_data
    full, expected = _run(data, tmp_path / "a", accumulation=accumulation)
    steps_per_epoch = full.completed_steps // 2
    assert steps_per_epoch >= 2
    stop = steps_per_epoch + 1  # in the middle of the second epoch, after a validation and a best-epoch choice
    interrupted, _ = _run(data, tmp_path / "b", max_train_steps=stop, accumulation=accumulation)
    assert interrupted.stopped_early and latest_checkpoint(tmp_path / "b").name == f"step-{stop:06d}"
    resumed, state = _run(data, tmp_path / "b", resume="latest", accumulation=accumulation)
    assert resumed.completed_steps == full.completed_steps
    assert [h["step"] for h in resumed.history] == [h["step"] for h in full.history]
    assert resumed.best_epoch == full.best_epoch
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0)


def test_vpt_deep_norms_trains_per_center_head_norms_and_leaves_the_base(tmp_path):
    from peft import PeftModel

    from peft_medseg.training import head_norm_modules

    base = tiny_base()
    norms = head_norm_modules(base)
    assert norms and all(name.startswith("decode_head.") for name in norms)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = set_train_mode(prepare_model(base, "vpt-deep-norms"))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    model(pixel_values=x).logits.square().mean().backward()
    optimizer.step()
    wrapper = model.base_model.model.get_submodule(norms[0])
    assert wrapper.modules_to_save["default"].training  # the center's copy re-estimates its statistics
    assert not torch.equal(wrapper.modules_to_save["default"].running_mean, wrapper.original_module.running_mean)
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    model.save_pretrained(tmp_path / "adapter")
    unloaded = model.unload()
    for key, value in before.items():  # the base's own weights and BatchNorm statistics never moved
        assert torch.equal(value, unloaded.state_dict()[key]), key
    reloaded = PeftModel.from_pretrained(tiny_base(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, expected)


def test_segformer_methods_key_value_prompts_and_lora():
    names_kv = trainable_names(prepare_model(build_segmentation_model("segformer-tiny", NUM_LABELS, 32), "vpt-kv"))
    assert any("attention.visual_prompt.vpt_prompt" in n for n in names_kv)
    assert all("vpt_prompt" in n or "classifier.modules_to_save" in n for n in names_kv)
    names_lora = trainable_names(prepare_model(build_segmentation_model("segformer-tiny", NUM_LABELS, 32), "lora"))
    stages = {n.split(".blocks.")[0] for n in names_lora if "lora_" in n}
    assert stages == {f"base_model.model.segformer.stages.{i}" for i in range(4)}


def test_beit_tiny_decodes_finer_and_the_default_adapter_round_trips(tmp_path):
    """The demo's base: BEiT's FPN hands the UperNet head maps up to 4x the token grid, so the head decodes at half
    the input size (`tiny`: 1/8). The default method trains on it, its frozen FPN BatchNorm stays put, and the saved
    adapter reloads onto a fresh base with the same outputs."""
    from peft import PeftModel

    from peft_medseg.training import DEFAULT_METHOD

    def beit():
        torch.manual_seed(0)
        return build_segmentation_model("beit-tiny", NUM_LABELS, image_size=IMAGE_SIZE).eval()

    base = beit()
    head_inputs = []
    hook = base.decode_head.register_forward_pre_hook(lambda module, args: head_inputs.append(args[0]))
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        base(pixel_values=x)
    hook.remove()
    assert max(f.shape[-1] for f in head_inputs[0]) == IMAGE_SIZE // 2
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = set_train_mode(prepare_model(base, DEFAULT_METHOD))
    assert not model.base_model.model.fpn.fpn1.normalization.training  # frozen BatchNorm of the backbone's FPN
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    labels = torch.randint(0, NUM_LABELS, (2, IMAGE_SIZE, IMAGE_SIZE))
    for _ in range(2):
        loss = segmentation_loss(model(pixel_values=x).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    model.save_pretrained(tmp_path / "adapter")
    for key, value in model.unload().state_dict().items():
        assert torch.equal(value, before[key]), key
    reloaded = PeftModel.from_pretrained(beit(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, expected)


def test_vpt_deep_decoder_routes_whole_head_copies_per_sample_and_leaves_the_base(tmp_path):
    """The opt-in `vpt-deep-decoder`: each center's own copy of the whole decode head, in one peft adapter. A mixed
    batch equals each group of samples run alone, in eval mode and in train mode (a copy's BatchNorms normalise with
    their own group's statistics), base rows take the base, and the base comes back bit-identical."""
    from peft import PeftModel

    import peft_medseg

    base = tiny_base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    for center, seed in (("A", 3), ("B", 4)):
        model = prepare_model(tiny_base(), "vpt-deep-decoder", num_virtual_tokens=2, prompt_dropout=0.0)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # trained-looking weights: an untouched copy equals the base and would hide a bad route
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(tmp_path / center)
    model = PeftModel.from_pretrained(base, str(tmp_path / "A"), adapter_name="A")
    model.load_adapter(str(tmp_path / "B"), adapter_name="B")
    x = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    names = ["B", peft_medseg.BASE_ADAPTER_NAME, "A"]
    model.eval()
    with torch.no_grad():
        mixed = model(pixel_values=x, adapter_names=names).logits
        with model.disable_adapter():  # in eval mode a row's output does not depend on the rest of its batch
            expected = {peft_medseg.BASE_ADAPTER_NAME: model(pixel_values=x).logits}
        for name in ("A", "B"):
            model.set_adapter(name)
            expected[name] = model(pixel_values=x).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], expected[name][row], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-3)  # two centers, two heads
    # Train mode, training A: rows 0 and 2 form one group, so A's head copy normalises over a batch of two.
    names = ["A", "B", "A"]
    model.set_adapter("A")
    set_train_mode(model)
    with torch.no_grad():
        mixed = model(pixel_values=x, adapter_names=names).logits
        torch.testing.assert_close(mixed[[0, 2]], model(pixel_values=x[[0, 2]]).logits, atol=1e-5, rtol=1e-5)
    for key, value in model.unload().state_dict().items():
        assert torch.equal(value, before[key]), key
