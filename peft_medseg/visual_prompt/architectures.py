"""Which transformer blocks accept prompts (token-level or key/value), and what an adapter records about its base."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

# Blocks that map tokens (B, N, D) -> (B, N, D) and attend globally, so prompt tokens can join the sequence.
# BEiT blocks compute a relative position bias sized to the sequence: it is padded for the prompts.
SUPPORTED_BLOCK_CLASSES = (
    "Dinov2Layer",
    "Dinov2WithRegistersLayer",
    "DINOv3ViTLayer",
    "DPTViTLayer",
    "BeitLayer",
)
SUPPORTED_MODELS = (
    "UperNetForSemanticSegmentation with Dinov2Backbone, Dinov2WithRegistersBackbone, DINOv3ViTBackbone or "
    "BeitBackbone; DPTForSemanticSegmentation; BeitForSemanticSegmentation"
)


@dataclass(frozen=True)
class KeyValueBlock:
    """Where key/value prompts go in a block: its attention child, the norm before it, and the attention layout.

    `layout` is `"global"` (every token attends to every token), `"rotary"` (global, with RoPE on the patch tokens:
    DINOv3), `"reduced"` (SegFormer: keys/values come from a spatially reduced sequence) or `"windowed"` (Swin:
    attention within windows of window_size² tokens).
    """

    attention: str
    norm: str
    layout: str


# Blocks whose attention accepts extra keys/values (`prompt_mode="key_value"`). Hierarchical encoders are here:
# they reshape tokens to feature maps inside the block, so prompts can join the attention but not the sequence.
# Plain ViT blocks are here too: on them the key/value mode is exactly deep VPT (tested), so token-level deep
# prompts on these blocks run as keys/values (`DEEP_KEY_VALUE_BLOCKS`), skipping the work VPT throws away.
KEY_VALUE_BLOCKS = {
    "SegformerLayer": KeyValueBlock(attention="attention", norm="layernorm_before", layout="reduced"),
    "SwinLayer": KeyValueBlock(attention="attention", norm="layernorm_before", layout="windowed"),
    "Dinov2Layer": KeyValueBlock(attention="attention", norm="norm1", layout="global"),
    "Dinov2WithRegistersLayer": KeyValueBlock(attention="attention", norm="norm1", layout="global"),
    "DINOv3ViTLayer": KeyValueBlock(attention="attention", norm="norm1", layout="rotary"),
}
# Token-level blocks whose deep prompts run as keys/values of their attention (`DeepKeyValuePromptLayer`): plain
# pre-norm ViT blocks whose attention takes no position bias sized to the sequence. DPT and BEiT keep the token path.
DEEP_KEY_VALUE_BLOCKS = {name: spec for name, spec in KEY_VALUE_BLOCKS.items() if spec.layout in ("global", "rotary")}
SUPPORTED_KEY_VALUE_BLOCK_CLASSES = tuple(KEY_VALUE_BLOCKS)
SUPPORTED_KEY_VALUE_MODELS = (
    "SegformerForSemanticSegmentation (every MiT size); UperNetForSemanticSegmentation with SwinBackbone, "
    "Dinov2Backbone, Dinov2WithRegistersBackbone or DINOv3ViTBackbone"
)


def find_blocks(
    model: nn.Module, block_classes: list[str] | None = None, prompt_mode: str = "tokens"
) -> tuple[str, list[tuple[str, nn.Module]]]:
    """The prompted block class and its blocks `(name, module)` in model order.

    Raises a `ValueError` naming the supported architectures (of that prompt mode) when the model has none of them.
    """
    key_value = prompt_mode == "key_value"
    supported = SUPPORTED_KEY_VALUE_BLOCK_CLASSES if key_value else SUPPORTED_BLOCK_CLASSES
    candidates = list(block_classes) if block_classes else list(supported)
    found: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        class_name = type(module).__name__
        if class_name in candidates:
            found.setdefault(class_name, []).append((name, module))
    if not found:
        model_name = type(model).__name__
        if block_classes:
            raise ValueError(f"{model_name} has no module of class {block_classes} (target_modules).")
        if key_value:
            raise ValueError(
                f"Key/value visual prompts do not support {model_name}: it has no block of a supported class "
                f"({', '.join(supported)}). Supported models: {SUPPORTED_KEY_VALUE_MODELS}. For plain ViT "
                "encoders (DINOv3, BEiT, DPT), use token-level prompts (prompt_mode='tokens')."
            )
        raise ValueError(
            f"Visual prompt tuning does not support {model_name}: it has no block of a supported class "
            f"({', '.join(SUPPORTED_BLOCK_CLASSES)}). Supported models: {SUPPORTED_MODELS}. Hierarchical encoders "
            "(SegFormer, Swin) reshape tokens inside their blocks, so token-level prompts cannot join them; for "
            "those, use key/value prompts (`VisualPromptConfig(prompt_mode='key_value')`) or peft's LoRA "
            "(`peft.LoraConfig(target_modules=['query', 'value'])`)."
        )
    if len(found) > 1:
        raise ValueError(
            f"{type(model).__name__} has blocks of several supported classes {sorted(found)}: choose one with "
            "target_modules."
        )
    ((block_class, blocks),) = found.items()
    unsupported = [c for c in found if c not in supported]
    if unsupported:
        raise ValueError(
            f"target_modules={unsupported} is not a supported block class for prompt_mode={prompt_mode!r}; "
            f"supported: {supported}."
        )
    return block_class, blocks


def encoder_config(model: nn.Module, block_name: str):
    """The config of the closest `PreTrainedModel` that owns the block (the encoder's config, not the head's)."""
    owner_config = getattr(model, "config", None)
    parts = block_name.split(".")
    module = model
    for part in parts[:-1]:
        module = getattr(module, part)
        if isinstance(module, PreTrainedModel):
            owner_config = module.config
    if owner_config is None:
        raise ValueError(f"Could not find the config of the encoder that holds {block_name}.")
    return owner_config


def describe_base(model: nn.Module, block_class: str, blocks: list[tuple[str, nn.Module]]) -> dict:
    """What an adapter records about the base it was made for."""
    config = encoder_config(model, blocks[0][0])
    patch_size = config.patch_size[0] if isinstance(config.patch_size, (tuple, list)) else config.patch_size
    num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    top_config = getattr(model, "config", None)
    base_model_type = getattr(top_config, "model_type", None) or type(model).__name__
    # The block's own weights only: prompts already injected for other centers are not part of the base.
    block_shapes = [
        [(n, list(p.shape)) for n, p in block.named_parameters() if not n.startswith("visual_prompt.")]
        for _, block in blocks
    ]
    signature = json.dumps(
        [base_model_type, config.model_type, block_class, num_prefix_tokens, block_shapes], sort_keys=True
    )
    return {
        "block_class": block_class,
        "hidden_size": int(config.hidden_size),
        "num_blocks": len(blocks),
        "num_prefix_tokens": num_prefix_tokens,
        "patch_size": int(patch_size),
        "base_model_type": base_model_type,
        "base_fingerprint": hashlib.sha256(signature.encode()).hexdigest()[:16],
    }


def describe_key_value_base(model: nn.Module, block_class: str, blocks: list[tuple[str, nn.Module]]) -> dict:
    """What a key/value prompt adapter records about its base.

    Hierarchical encoders change width from stage to stage: `hidden_size` records the widest attention (every
    block's own width is in the fingerprint). Key/value prompts have no position in the token sequence, so
    `num_prefix_tokens` is 0.
    """
    config = encoder_config(model, blocks[0][0])
    attention_name = KEY_VALUE_BLOCKS[block_class].attention
    widths = [getattr(block, attention_name).k_proj.in_features for _, block in blocks]
    patch_size = getattr(config, "patch_sizes", None) or config.patch_size  # SegFormer: one per stage
    while isinstance(patch_size, (tuple, list)):
        patch_size = patch_size[0]
    top_config = getattr(model, "config", None)
    base_model_type = getattr(top_config, "model_type", None) or type(model).__name__
    # The block's own weights only: prompts already injected for other centers are not part of the base.
    block_shapes = [
        [(n, list(p.shape)) for n, p in block.named_parameters() if "visual_prompt." not in n] for _, block in blocks
    ]
    signature = json.dumps(
        [base_model_type, config.model_type, block_class, "key_value", block_shapes], sort_keys=True
    )
    return {
        "block_class": block_class,
        "hidden_size": max(widths),
        "num_blocks": len(blocks),
        "num_prefix_tokens": 0,
        "patch_size": int(patch_size),
        "base_model_type": base_model_type,
        "base_fingerprint": hashlib.sha256(signature.encode()).hexdigest()[:16],
    }
