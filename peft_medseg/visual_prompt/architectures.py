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
    "TransformerBlock",  # MONAI's ViT blocks: UNETR, ViT
)
SUPPORTED_MODELS = (
    "UperNetForSemanticSegmentation with Dinov2Backbone, Dinov2WithRegistersBackbone, DINOv3ViTBackbone or "
    "BeitBackbone; DPTForSemanticSegmentation; BeitForSemanticSegmentation; MONAI's UNETR (2D or 3D)"
)


@dataclass(frozen=True)
class KeyValueBlock:
    """Where key/value prompts go in a block: its attention child, the norm before it, and the attention layout.

    `layout` is `"global"` (every token attends to every token), `"rotary"` (global, with RoPE on the patch tokens:
    DINOv3), `"reduced"` (SegFormer: keys/values come from a spatially reduced sequence), `"windowed"` (Swin:
    attention within windows of window_size² tokens) or `"monai_windowed"` (MONAI's Swin UNETR: windows of
    window_size³ voxels in 3D, one fused qkv projection).
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
    "SwinTransformerBlock": KeyValueBlock(attention="attn", norm="norm1", layout="monai_windowed"),
}
# Token-level blocks whose deep prompts run as keys/values of their attention (`DeepKeyValuePromptLayer`): plain
# pre-norm ViT blocks whose attention takes no position bias sized to the sequence. DPT and BEiT keep the token path.
DEEP_KEY_VALUE_BLOCKS = {name: spec for name, spec in KEY_VALUE_BLOCKS.items() if spec.layout in ("global", "rotary")}
SUPPORTED_KEY_VALUE_BLOCK_CLASSES = tuple(KEY_VALUE_BLOCKS)
# The output projection of each block class's MLP (`VisualPromptConfig.mlp_rank`), relative to the block.
MLP_OUTPUT_PROJECTIONS = {
    "Dinov2Layer": "mlp.fc2",
    "Dinov2WithRegistersLayer": "mlp.fc2",
    "DINOv3ViTLayer": "mlp.down_proj",
    "DPTViTLayer": "output.dense",
    "BeitLayer": "mlp.fc2",
    "TransformerBlock": "mlp.linear2",  # MONAI's ViT (UNETR)
    "SegformerLayer": "mlp.fc2",
    "SwinLayer": "mlp.fc2",
    "SwinTransformerBlock": "mlp.linear2",  # MONAI's Swin UNETR
}
# Children that adapters add to a block; the base's description leaves them out.
ADAPTER_CHILDREN = ("visual_prompt", "mlp_update")
SUPPORTED_KEY_VALUE_MODELS = (
    "SegformerForSemanticSegmentation (every MiT size); UperNetForSemanticSegmentation with SwinBackbone, "
    "Dinov2Backbone, Dinov2WithRegistersBackbone or DINOv3ViTBackbone; MONAI's SwinUNETR (2D or 3D)"
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
    """The config of the closest `PreTrainedModel` that owns the block (the encoder's config, not the head's), or
    None for a model outside transformers (MONAI)."""
    owner_config = getattr(model, "config", None)
    if not isinstance(model, PreTrainedModel) and not hasattr(owner_config, "model_type"):
        owner_config = None
    parts = block_name.split(".")
    module = model
    for part in parts[:-1]:
        module = getattr(module, part)
        if isinstance(module, PreTrainedModel):
            owner_config = module.config
    return owner_config


def is_monai_model(model: nn.Module) -> bool:
    """Whether `model` is (a subclass of) a MONAI network."""
    return any(cls.__module__.startswith("monai.") for cls in type(model).__mro__)


def base_model_type(model: nn.Module) -> str:
    """What an adapter records as the kind of its base: transformers' `model_type`, or the MONAI network's class
    name (`UNETR`, `SwinUNETR`), the same for MONAI's class and a subclass of it (such as a Hub-mixin wrapper)."""
    top_config = getattr(model, "config", None)
    model_type = getattr(top_config, "model_type", None)
    if model_type:
        return model_type
    for cls in type(model).__mro__:
        if cls.__module__.startswith("monai."):
            return cls.__name__
    return type(model).__name__


def _encoder_geometry(model: nn.Module, blocks: list[tuple[str, nn.Module]]) -> tuple[str, int, int]:
    """(encoder type, patch size, prefix tokens) of the encoder that holds `blocks`."""
    config = encoder_config(model, blocks[0][0])
    if config is not None:
        patch_size = getattr(config, "patch_sizes", None) or config.patch_size  # SegFormer: one per stage
        while isinstance(patch_size, (tuple, list)):
            patch_size = patch_size[0]
        return config.model_type, int(patch_size), 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    if not is_monai_model(model):
        raise ValueError(f"Could not find the config of the encoder that holds {blocks[0][0]}.")
    # MONAI: UNETR and SwinUNETR keep `patch_size` on the network or its patch embedding; a ViT prepends a CLS token
    # only when built for classification.
    patch_size = next(
        (m.patch_size for m in model.modules() if isinstance(getattr(m, "patch_size", None), (int, tuple, list))),
        None,
    )
    if patch_size is None:
        raise ValueError(f"{type(model).__name__}: no patch_size on the network or its patch embedding.")
    while isinstance(patch_size, (tuple, list)):
        patch_size = patch_size[0]
    encoder_name = blocks[0][0].split(".")[0]
    num_prefix_tokens = int(hasattr(getattr(model, encoder_name, model), "cls_token"))
    return f"monai.{type(getattr(model, encoder_name, model)).__name__}", int(patch_size), num_prefix_tokens


def mlp_output_targets(block_class: str, blocks: list[tuple[str, nn.Module]], layers: list[int]) -> list[str]:
    """Names of the MLP output projections (`nn.Linear`) of the blocks at `layers`, checked before injection."""
    relative = MLP_OUTPUT_PROJECTIONS.get(block_class)
    if relative is None:
        raise ValueError(
            f"mlp_rank: no known MLP output projection in {block_class} blocks; supported: {sorted(MLP_OUTPUT_PROJECTIONS)}."
        )
    names = []
    for i in layers:
        name, block = blocks[i]
        try:
            projection = block.get_submodule(relative)
        except AttributeError:
            projection = None
        if not isinstance(projection, nn.Linear):
            found = type(projection).__name__ if projection is not None else "nothing"
            raise ValueError(f"mlp_rank: {name}.{relative} should be the block's MLP output nn.Linear, found {found}.")
        names.append(f"{name}.{relative}")
    return names


def _base_parameters(block: nn.Module) -> list[tuple[str, list[int]]]:
    """A block's own parameters and their shapes, without those of adapters injected into it."""
    return [(n, list(p.shape)) for n, p in block.named_parameters() if not set(n.split(".")) & set(ADAPTER_CHILDREN)]


def attention_width(attention: nn.Module) -> int:
    """The width of an attention module's input: its key projection's (transformers) or fused qkv's (MONAI)."""
    projection = attention.k_proj if hasattr(attention, "k_proj") else attention.qkv
    return int(projection.in_features)


def describe_base(model: nn.Module, block_class: str, blocks: list[tuple[str, nn.Module]]) -> dict:
    """What an adapter records about the base it was made for."""
    encoder_type, patch_size, num_prefix_tokens = _encoder_geometry(model, blocks)
    model_type = base_model_type(model)
    # The block's own weights only: adapters already injected for other centers are not part of the base.
    block_shapes = [_base_parameters(block) for _, block in blocks]
    hidden_size = int(blocks[0][1].norm1.normalized_shape[0]) if hasattr(blocks[0][1], "norm1") else None
    config = encoder_config(model, blocks[0][0])
    if config is not None:
        hidden_size = int(config.hidden_size)
    signature = json.dumps([model_type, encoder_type, block_class, num_prefix_tokens, block_shapes], sort_keys=True)
    return {
        "block_class": block_class,
        "hidden_size": hidden_size,
        "num_blocks": len(blocks),
        "num_prefix_tokens": num_prefix_tokens,
        "patch_size": patch_size,
        "base_model_type": model_type,
        "base_fingerprint": hashlib.sha256(signature.encode()).hexdigest()[:16],
    }


def describe_key_value_base(model: nn.Module, block_class: str, blocks: list[tuple[str, nn.Module]]) -> dict:
    """What a key/value prompt adapter records about its base.

    Hierarchical encoders change width from stage to stage: `hidden_size` records the widest attention (every
    block's own width is in the fingerprint). Key/value prompts have no position in the token sequence, so
    `num_prefix_tokens` is 0.
    """
    encoder_type, patch_size, _ = _encoder_geometry(model, blocks)
    attention_name = KEY_VALUE_BLOCKS[block_class].attention
    widths = [attention_width(getattr(block, attention_name)) for _, block in blocks]
    model_type = base_model_type(model)
    # The block's own weights only: adapters already injected for other centers are not part of the base.
    block_shapes = [_base_parameters(block) for _, block in blocks]
    signature = json.dumps([model_type, encoder_type, block_class, "key_value", block_shapes], sort_keys=True)
    return {
        "block_class": block_class,
        "hidden_size": max(widths),
        "num_blocks": len(blocks),
        "num_prefix_tokens": 0,
        "patch_size": patch_size,
        "base_model_type": model_type,
        "base_fingerprint": hashlib.sha256(signature.encode()).hexdigest()[:16],
    }
