"""Key/value prompts: deep VPT inside attention, for encoders whose blocks reshape tokens (SegFormer, Swin).

Deep VPT's prompts reach the patch tokens only through attention: they enter a block as extra tokens, the block's
norm and key/value projections turn them into keys and values, and their own outputs are thrown away. So the same
prompts can be appended to the keys and values of the attention directly, which works for any attention layout:
global (ViT), spatially reduced (SegFormer) and windowed (Swin).
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .architectures import KEY_VALUE_BLOCKS
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
        attention_forward = type(attention).forward
        num_rows = hidden_states.shape[0]
        # Swin attends within windows: its rows are the windows of each image, batch-major (image i owns rows
        # i*nW ... (i+1)*nW - 1), and every window of an image gets that image's prompts.
        num_images = len(self.adapter_names) if self.adapter_names is not None else num_rows
        if num_rows % num_images:
            raise ValueError(f"{num_rows} attention rows cannot be split among {num_images} samples.")
        windows_per_image = num_rows // num_images
        image_adapters = self._row_adapters(num_images)
        if image_adapters is None or all(name is None for name in image_adapters):
            return attention_forward(attention, hidden_states, *args, **kwargs)
        layout_forward = LAYOUT_FORWARDS[self.layout]

        if all(name is not None for name in image_adapters):
            keys, values = self._prompt_keys_values(attention, image_adapters, windows_per_image, hidden_states.dtype)
            return layout_forward(attention, hidden_states, keys, values, *args, **kwargs)

        # Some samples take no prompts here ("__base__", or an adapter that does not prompt this layer): run them as
        # their own group through the attention's own forward, so they see exactly the base computation.
        row_adapters = [name for name in image_adapters for _ in range(windows_per_image)]
        prompted = [i for i, name in enumerate(row_adapters) if name is not None]
        plain = [i for i, name in enumerate(row_adapters) if name is None]
        prompted_index = torch.tensor(prompted, device=hidden_states.device)
        plain_index = torch.tensor(plain, device=hidden_states.device)
        prompted_adapters = [name for name in image_adapters if name is not None]
        keys, values = self._prompt_keys_values(attention, prompted_adapters, windows_per_image, hidden_states.dtype)
        p_args, p_kwargs = _select_rows(args, kwargs, prompted_index, num_rows)
        output_p, weights_p = layout_forward(
            attention, hidden_states[prompted_index], keys, values, *p_args, **p_kwargs
        )
        n_args, n_kwargs = _select_rows(args, kwargs, plain_index, num_rows)
        output_n, weights_n = attention_forward(attention, hidden_states[plain_index], *n_args, **n_kwargs)
        order = torch.argsort(torch.cat([prompted_index, plain_index]))
        output = torch.cat([output_p, output_n])[order]
        weights = None
        if weights_p is not None and weights_n is not None:
            # Plain rows give no weight to the prompt keys (the last columns).
            weights_n = nn.functional.pad(weights_n, (0, keys.shape[2]))
            weights = torch.cat([weights_p, weights_n])[order]
        return output, weights

    def _prompt_keys_values(
        self, attention: nn.Module, adapters: list[str], windows_per_image: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the prompts, (rows, heads, num_virtual_tokens, head_dim), for these samples' adapters."""
        names = sorted(set(adapters))
        sizes = {name: self.vpt_prompt[name].shape[0] for name in names}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"A mixed batch needs the same num_virtual_tokens for every adapter, got {sizes}.")
        p = max(self.vpt_dropout[name] for name in names)
        device = self.vpt_prompt[names[0]].device
        if self.training and p > 0:
            # One dropout mask per sample (shared by its windows), as token-level prompts get.
            prompts = nn.functional.dropout(torch.stack([self.vpt_prompt[name] for name in adapters]), p=p)
            source = torch.arange(len(adapters), device=device)
        else:
            # Each adapter's keys/values once, then gathered per row: cheap when windows multiply the rows.
            prompts = torch.stack([self.vpt_prompt[name] for name in names])
            source = torch.tensor([names.index(name) for name in adapters], device=device)
        tokens = self.prompt_norm(prompts.to(dtype))
        shape = (*tokens.shape[:-1], -1, attention.head_dim)
        keys = attention.k_proj(tokens).view(shape).transpose(1, 2)
        values = attention.v_proj(tokens).view(shape).transpose(1, 2)
        rows = source.repeat_interleave(windows_per_image)
        return keys[rows], values[rows]


def _prompted_attention_forward(attention: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    return attention.visual_prompt(attention, hidden_states, *args, **kwargs)


# ----------------------------------------------------------------------------- the three attention layouts
# Each mirrors its module's own forward (transformers 5.x), with the prompt keys/values appended.


def _global_attention(attention, hidden_states, prompt_keys, prompt_values, attention_mask=None, **kwargs):
    """DINOv2: keys and values come from the same tokens as the queries."""
    query, key, value = _project(attention, hidden_states, hidden_states)
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


LAYOUT_FORWARDS = {"global": _global_attention, "reduced": _reduced_attention, "windowed": _windowed_attention}


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
        dropout=0.0 if not attention.training else attention.attention_dropout,
        scaling=attention.scaling,
        **kwargs,
    )
    output = output.reshape(*hidden_states.shape[:-1], -1).contiguous()
    return attention.o_proj(output), weights


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
