"""Key/value prompts: deep VPT inside attention, for encoders whose blocks reshape tokens (SegFormer, Swin, Swin UNETR).

Deep VPT's prompts reach the patch tokens only through attention: they enter a block as extra tokens, the block's
norm and key/value projections turn them into keys and values, and their own outputs are thrown away. So the same
prompts can be appended to the keys and values of the attention directly, which works for any attention layout:
global (ViT), spatially reduced (SegFormer) and windowed (Swin).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.dinov3_vit.modeling_dinov3_vit import apply_rotary_pos_emb as dinov3_apply_rotary_pos_emb

from .architectures import KEY_VALUE_BLOCKS, KeyValueBlock
from .layer import PromptCarry, VisualPromptLayer, _select_rows


class KeyValuePromptLayer(VisualPromptLayer):
    """Prompts of every adapter for one attention layer, appended to that layer's keys and values.

    The layer is a child of the attention module (`attention.visual_prompt`), whose `forward` is overridden on the
    instance: queries are the module's own; keys and values are the module's own followed by the prompts', computed
    as `k_proj(norm(prompts))` and `v_proj(norm(prompts))`; the attention function is the module's own. Nothing
    changes shape outside attention, so blocks, recorded hidden states, backbones and necks see patch tokens only.

    Per adapter the prompts are `(num_virtual_tokens, width)` with the width of this attention layer. Adding,
    switching, mixing and deleting adapters work as for token-level prompts (`VisualPromptLayer`).
    """

    def __init__(self, attention: nn.Module, prompt_norm: nn.Module, layout: str) -> None:
        # Key/value prompts have no position in the token sequence and carry nothing from block to block.
        super().__init__(attention, num_prefix_tokens=0, carry=PromptCarry())
        self.layout = layout
        # The norm belongs to the base model: referenced, not registered as a child, so that it is neither saved with
        # the adapter nor listed twice among the model's modules. deepcopy maps the reference to the copied norm.
        object.__setattr__(self, "prompt_norm", prompt_norm)

    # ----------------------------------------------------------------- attention patching
    def _install(self, attention: nn.Module) -> None:
        attention.forward = types.MethodType(_prompted_attention_forward, attention)

    @staticmethod
    def uninstall(attention: nn.Module) -> None:
        """Restore the attention's own forward and remove its prompt layer."""
        attention.__dict__.pop("forward", None)
        del attention.visual_prompt

    # ----------------------------------------------------------------- forward
    def forward(self, attention: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The attention's forward with each sample's prompts appended to its keys and values."""
        num_rows = hidden_states.shape[0]
        # Swin attends within windows: its rows are the windows of each image, batch-major (image i owns rows
        # i*nW ... (i+1)*nW - 1), and every window of an image gets that image's prompts.
        num_images = len(self.adapter_names) if self.adapter_names is not None else num_rows
        if num_rows % num_images:
            raise ValueError(f"{num_rows} attention rows cannot be split among {num_images} samples.")
        image_adapters = self._row_adapters(num_images)
        if image_adapters is None or all(name is None for name in image_adapters):
            return type(attention).forward(attention, hidden_states, *args, **kwargs)
        rows = select_prompt_rows(self, image_adapters, self.prompt_norm, self.layout)
        return attend_with_prompts(attention, hidden_states, rows, args, kwargs)


@dataclass
class PromptRows:
    """What an attention layer needs to append the prompts of a batch to its keys and values.

    `prompts` (m, num_virtual_tokens, width) are the distinct prompt sets (one per adapter, or one per sample when
    dropout draws a mask per sample); `source` (number of prompted images,) says which set each prompted image uses;
    `image_adapters` has one entry per image, None for an image that takes no prompts here; `norm` is the base's norm
    that feeds the key/value projections; `layout` the attention layout (see `KeyValueBlock`).
    """

    prompts: torch.Tensor
    source: torch.Tensor
    image_adapters: list[str | None]
    norm: nn.Module
    layout: str


def select_prompt_rows(
    layer: VisualPromptLayer, image_adapters: list[str | None], norm: nn.Module, layout: str
) -> PromptRows:
    """`PromptRows` for the prompted images (those with an adapter, in batch order) of `image_adapters`, from
    `layer`'s prompts, with prompt dropout applied (one mask per sample)."""
    adapters = [name for name in image_adapters if name is not None]
    names = sorted(set(adapters))
    sizes = {name: layer.vpt_prompt[name].shape[0] for name in names}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"A mixed batch needs the same num_virtual_tokens for every adapter, got {sizes}.")
    p = max(layer.vpt_dropout[name] for name in names)
    device = layer.vpt_prompt[names[0]].device
    if layer.training and p > 0:
        # One dropout mask per sample (shared by its windows), as token-level prompts get.
        prompts = nn.functional.dropout(torch.stack([layer.vpt_prompt[name] for name in adapters]), p=p)
        source = torch.arange(len(adapters), device=device)
    else:
        # Each adapter's keys/values once, then gathered per row: cheap when windows multiply the rows.
        prompts = torch.stack([layer.vpt_prompt[name] for name in names])
        source = torch.tensor([names.index(name) for name in adapters], device=device)
    return PromptRows(prompts, source, list(image_adapters), norm, layout)


class DeepKeyValuePromptLayer(VisualPromptLayer):
    """Token-level prompts of a plain ViT block that run deep prompts through the block's attention only.

    A deep prompt's own output is thrown away after its block, so all it gives the patch tokens is its key and value
    in that block's attention (see `KeyValuePromptLayer`). This layer sits where `VisualPromptLayer` sits (the block's
    `visual_prompt` child, same parameter names, so the same adapter files) but, when every prompted sample of the
    batch is deep here, computes only that: `k_proj(norm1(prompts))` and `v_proj(norm1(prompts))` appended to the
    keys and values of the block's own attention, with the model's own attention function (SDPA where the model uses
    SDPA). The prompts' queries, attention rows, output projection and MLP, which VPT would compute and discard, are
    never computed. Shallow prompts (whose outputs go on to the next block) take the token path of the parent class.

    The prompts reach the attention as a keyword argument of the block's own forward (`vpt_prompt_rows`), which the
    block passes on to its attention: so activation checkpointing, which replays the block's forward in the backward
    pass, replays it with the same prompts.
    """

    def __init__(self, block: nn.Module, num_prefix_tokens: int, carry: PromptCarry, spec: KeyValueBlock) -> None:
        super().__init__(block, num_prefix_tokens, carry)
        self.layout = spec.layout
        self.attention_name = spec.attention
        # The norm belongs to the base model: referenced, not registered as a child (see `KeyValuePromptLayer`).
        object.__setattr__(self, "prompt_norm", getattr(block, spec.norm))
        attention = getattr(block, spec.attention)
        attention.forward = types.MethodType(_deep_prompt_attention_forward, attention)

    @staticmethod
    def uninstall(block: nn.Module) -> None:
        """Restore the block's and its attention's own forwards and remove the prompt layer."""
        getattr(block, block.visual_prompt.attention_name).__dict__.pop("forward", None)
        VisualPromptLayer.uninstall(block)

    def runs_as_key_values(self, row_adapters: list[str | None]) -> bool:
        """Whether this block call can skip the prompt tokens: every prompted sample's prompts end at this block."""
        return all(name is None or self.vpt_role[name] == "insert" for name in row_adapters)

    def forward(self, block: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        row_adapters = self._row_adapters(hidden_states.shape[0])
        if (
            row_adapters is None
            or all(name is None for name in row_adapters)
            or not self.runs_as_key_values(row_adapters)
        ):
            return super().forward(block, hidden_states, *args, **kwargs)
        rows = select_prompt_rows(self, row_adapters, self.prompt_norm, self.layout)
        output = type(block).forward(block, hidden_states, *args, vpt_prompt_rows=rows, **kwargs)
        self.carry.tokens = None  # nothing carries deep prompts to the next block
        return output


def _deep_prompt_attention_forward(
    attention: nn.Module, hidden_states: torch.Tensor, *args: Any, vpt_prompt_rows: PromptRows | None = None, **kwargs
):
    if vpt_prompt_rows is None:
        return type(attention).forward(attention, hidden_states, *args, **kwargs)
    return attend_with_prompts(attention, hidden_states, vpt_prompt_rows, args, kwargs)


def attend_with_prompts(
    attention: nn.Module, hidden_states: torch.Tensor, rows: PromptRows, args: tuple, kwargs: dict
) -> Any:
    """`attention`'s forward with each image's prompts (`rows`) appended to its keys and values.

    Attention rows are the images, or the windows of each image batch-major (Swin). Images without prompts run as
    their own group through the attention's own forward, so they see exactly the base computation.
    """
    attention_forward = type(attention).forward
    num_rows = hidden_states.shape[0]
    windows_per_image = num_rows // len(rows.image_adapters)
    layout_forward = LAYOUT_FORWARDS[rows.layout]
    keys, values = _prompt_keys_values(attention, rows, windows_per_image, hidden_states.dtype)
    if all(name is not None for name in rows.image_adapters):
        output, weights = layout_forward(attention, hidden_states, keys, values, *args, **kwargs)
        return output if rows.layout in TENSOR_OUTPUT_LAYOUTS else (output, weights)

    row_adapters = [name for name in rows.image_adapters for _ in range(windows_per_image)]
    prompted_index = torch.tensor([i for i, n in enumerate(row_adapters) if n is not None], device=keys.device)
    plain_index = torch.tensor([i for i, n in enumerate(row_adapters) if n is None], device=keys.device)
    p_args, p_kwargs = _select_rows(args, kwargs, prompted_index, num_rows)
    output_p, weights_p = layout_forward(attention, hidden_states[prompted_index], keys, values, *p_args, **p_kwargs)
    n_args, n_kwargs = _select_rows(args, kwargs, plain_index, num_rows)
    output_n = attention_forward(attention, hidden_states[plain_index], *n_args, **n_kwargs)
    # transformers' attention returns (output, weights); MONAI's the output alone.
    output_n, weights_n = output_n if isinstance(output_n, tuple) else (output_n, None)
    order = torch.argsort(torch.cat([prompted_index, plain_index]))
    output = torch.cat([output_p, output_n])[order]
    weights = None
    if weights_p is not None and weights_n is not None:
        # Plain rows give no weight to the prompt keys (the last columns).
        weights_n = nn.functional.pad(weights_n, (0, keys.shape[2]))
        weights = torch.cat([weights_p, weights_n])[order]
    return output if rows.layout in TENSOR_OUTPUT_LAYOUTS else (output, weights)


def _prompt_keys_values(
    attention: nn.Module, rows: PromptRows, windows_per_image: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the prompts, (prompted rows, heads, num_virtual_tokens, head_dim)."""
    tokens = rows.norm(rows.prompts.to(dtype))
    if hasattr(attention, "k_proj"):
        shape = (*tokens.shape[:-1], -1, attention.head_dim)
        keys = attention.k_proj(tokens).view(shape).transpose(1, 2)
        values = attention.v_proj(tokens).view(shape).transpose(1, 2)
    else:
        # MONAI: one fused projection, rows [q; k; v] of its weight.
        width = tokens.shape[-1]
        weight, bias = attention.qkv.weight, attention.qkv.bias
        shape = (*tokens.shape[:-1], attention.num_heads, width // attention.num_heads)

        def project(part: int) -> torch.Tensor:
            rows_ = slice(part * width, (part + 1) * width)
            projected = nn.functional.linear(tokens, weight[rows_], None if bias is None else bias[rows_])
            return projected.view(shape).transpose(1, 2)

        keys, values = project(1), project(2)
    num_rows = rows.source.numel() * windows_per_image
    if keys.shape[0] == 1:
        # One prompt set: a broadcast view, not one copy per row (the concatenation with the keys copies once anyway).
        return keys.expand(num_rows, -1, -1, -1), values.expand(num_rows, -1, -1, -1)
    index = rows.source.repeat_interleave(windows_per_image)
    return keys[index], values[index]


def _prompted_attention_forward(attention: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    return attention.visual_prompt(attention, hidden_states, *args, **kwargs)


# ----------------------------------------------------------------------------- the three attention layouts
# Each mirrors its module's own forward (transformers 5.x), with the prompt keys/values appended.


def _global_attention(attention, hidden_states, prompt_keys, prompt_values, attention_mask=None, **kwargs):
    """DINOv2: keys and values come from the same tokens as the queries."""
    query, key, value = _project(attention, hidden_states, hidden_states)
    return _attend(attention, hidden_states, query, key, value, prompt_keys, prompt_values, attention_mask, kwargs)


def _rotary_attention(
    attention, hidden_states, prompt_keys, prompt_values, attention_mask=None, position_embeddings=None, **kwargs
):
    """DINOv3: like DINOv2, with RoPE on the patch tokens' queries and keys; prompt keys have no position."""
    query, key, value = _project(attention, hidden_states, hidden_states)
    cos, sin = position_embeddings
    query, key = dinov3_apply_rotary_pos_emb(query, key, cos, sin)
    return _attend(attention, hidden_states, query, key, value, prompt_keys, prompt_values, attention_mask, kwargs)


def _reduced_attention(
    attention, hidden_states, prompt_keys, prompt_values, height, width, attention_mask=None, **kwargs
):
    """SegFormer: keys and values come from the spatially reduced sequence, which the prompts join."""
    kv_states = hidden_states
    if attention.sequence_reduction_ratio > 1:
        kv_states = attention.sequence_reduction(hidden_states, height, width)
    query, key, value = _project(attention, hidden_states, kv_states)
    return _attend(attention, hidden_states, query, key, value, prompt_keys, prompt_values, attention_mask, kwargs)


def _windowed_attention(attention, hidden_states, prompt_keys, prompt_values, attention_mask=None, **kwargs):
    """Swin: attention within each window, with a relative position bias and, for shifted windows, a mask."""
    query, key, value = _project(attention, hidden_states, hidden_states)
    mask = attention.relative_position_bias()  # (1, heads, w², w²)
    if attention_mask is not None:
        # The shifted-window mask (nW, w², w²) repeats for every image: rows are batch-major windows.
        num_images = hidden_states.shape[0] // attention_mask.shape[0]
        mask = mask + attention_mask.repeat(num_images, 1, 1).unsqueeze(1)
    return _attend(attention, hidden_states, query, key, value, prompt_keys, prompt_values, mask, kwargs)


def _monai_windowed_attention(attention, hidden_states, prompt_keys, prompt_values, mask=None):
    """MONAI's Swin UNETR `WindowAttention` (2D or 3D windows, fused qkv, eager softmax), with the prompts' keys and
    values appended: they get no relative position bias and are never masked by the shifted windows. Returns
    (output, None) like the other layouts; `attend_with_prompts` hands MONAI the output alone."""
    b, n, c = hidden_states.shape
    qkv = attention.qkv(hidden_states).reshape(b, n, 3, attention.num_heads, c // attention.num_heads)
    query, key, value = qkv.permute(2, 0, 3, 1, 4)
    bias = attention.relative_position_bias_table[attention.relative_position_index.clone()[:n, :n].reshape(-1)]
    bias = bias.reshape(n, n, -1).permute(2, 0, 1).contiguous()  # (heads, n, n)
    num_prompts = prompt_keys.shape[2]
    key = torch.cat([key, prompt_keys], dim=2)
    value = torch.cat([value, prompt_values], dim=2)
    scores = (query * attention.scale) @ key.transpose(-2, -1)  # (b, heads, n, n + prompts)
    additive = nn.functional.pad(bias, (0, num_prompts)).unsqueeze(0)
    if mask is not None:
        # The shifted-window mask (nW, n, n) repeats for every image: rows are batch-major windows.
        num_windows = mask.shape[0]
        additive = additive + nn.functional.pad(mask, (0, num_prompts)).unsqueeze(1).repeat(b // num_windows, 1, 1, 1)
    weights = attention.attn_drop(attention.softmax(scores + additive)).to(value.dtype)
    output = (weights @ value).transpose(1, 2).reshape(b, n, c)
    return attention.proj_drop(attention.proj(output)), None


LAYOUT_FORWARDS = {
    "global": _global_attention,
    "rotary": _rotary_attention,
    "reduced": _reduced_attention,
    "windowed": _windowed_attention,
    "monai_windowed": _monai_windowed_attention,
}
# Layouts whose attention module returns its output alone (MONAI), not (output, weights) (transformers).
TENSOR_OUTPUT_LAYOUTS = ("monai_windowed",)


def _project(attention, hidden_states, kv_states):
    """Queries from the tokens, keys and values from `kv_states`, each (rows, heads, length, head_dim)."""

    def heads(x):
        return x.view(*x.shape[:-1], -1, attention.head_dim).transpose(1, 2)

    return (
        heads(attention.q_proj(hidden_states)),
        heads(attention.k_proj(kv_states)),
        heads(attention.v_proj(kv_states)),
    )


def _attend(attention, hidden_states, query, key, value, prompt_keys, prompt_values, mask, kwargs):
    """The module's own attention function over its keys/values followed by the prompts'; then its output proj."""
    key = torch.cat([key, prompt_keys], dim=2)
    value = torch.cat([value, prompt_values], dim=2)
    if mask is not None:
        # Prompt keys have no position: no relative position bias, never masked (additive zeros / True).
        fill = True if mask.dtype == torch.bool else 0.0
        mask = torch.cat([mask, mask.new_full((*mask.shape[:-1], prompt_keys.shape[2]), fill)], dim=-1)
    eager = sys.modules[type(attention).__module__].eager_attention_forward
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager)
    output, weights = attention_interface(
        attention,
        query,
        key,
        value,
        mask,
        dropout=0.0 if not attention.training else _attention_dropout(attention),
        scaling=attention.scaling,
        **kwargs,
    )
    output = output.reshape(*hidden_states.shape[:-1], -1).contiguous()
    return attention.o_proj(output), weights


def _attention_dropout(attention: nn.Module) -> float:
    # DINOv2, SegFormer and Swin call it `attention_dropout`; DINOv3 calls it `dropout`.
    return attention.attention_dropout if hasattr(attention, "attention_dropout") else attention.dropout


# ----------------------------------------------------------------------------- targets
def key_value_targets(block_class: str, blocks: list[tuple[str, nn.Module]], layers: list[int]) -> dict:
    """`{attention module name: (prompt norm, layout)}` for the prompted blocks.

    The prompt norm is the one that feeds the key/value projections, the analogue of "the block's layer norm" for
    token-level prompts: the block's pre-attention norm, except in SegFormer stages with spatial reduction, where
    keys/values come from the reduced sequence after the reduction's own LayerNorm: the prompts join that sequence.
    """
    spec = KEY_VALUE_BLOCKS[block_class]
    targets = {}
    for i in layers:
        name, block = blocks[i]
        attention = getattr(block, spec.attention)
        norm = getattr(block, spec.norm)
        if spec.layout == "reduced" and attention.sequence_reduction_ratio > 1:
            norm = attention.sequence_reduction.layer_norm
        targets[f"{name}.{spec.attention}"] = (norm, spec.layout)
    return targets
