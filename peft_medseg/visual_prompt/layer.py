"""The prompt layer: a small child module of a transformer block that holds the prompts and prompts the block."""

from __future__ import annotations

import math
import types
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import VisualPromptConfig
from .update_layer import routed_rows

BASE_ADAPTER_NAME = "__base__"  # in `adapter_names`, a sample that runs through the base model without prompts
# What an adapter's prompts do at one block: see `VisualPromptLayer`.
PROMPT_ROLES = ("insert", "start", "carry")


class PromptCarry:
    """Carries shallow prompts from one block to the next within one forward pass (not a module: holds no weights).

    Shared by the prompt layers of one model. `tokens` is (batch, num_virtual_tokens, hidden) with the prompt outputs
    of the last block for the rows that carry shallow prompts.
    """

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None

    def __deepcopy__(self, memo):
        # A copied model starts with nothing in flight.
        return PromptCarry()


class VisualPromptLayer(nn.Module, BaseTunerLayer):
    """Prompts of every adapter for one block, and the prompted forward of that block.

    The layer is a child of its block (`block.visual_prompt`) and the block's `forward` is overridden on the
    instance: insert the prompts after the CLS/register tokens, run the block's own forward, strip the prompts. So
    everything outside the block (hidden-state capture, backbones, necks, gradient checkpointing) only ever sees the
    patch tokens, and `unload()` restores the block exactly.

    Per adapter, a layer plays one of three roles: `"insert"` (deep VPT: fresh prompts whose outputs are thrown away
    after the block), `"start"` (the first block of shallow VPT: fresh prompts whose outputs go on to the next block)
    or `"carry"` (later blocks of shallow VPT: the previous block's prompt outputs).
    """

    adapter_layer_names = ("vpt_prompt",)
    other_param_names = ("vpt_role", "vpt_dropout")

    def __init__(self, block: nn.Module, num_prefix_tokens: int, carry: PromptCarry) -> None:
        super().__init__()
        self.vpt_prompt = nn.ParameterDict({})
        self.vpt_role: dict[str, str] = {}
        self.vpt_dropout: dict[str, float] = {}
        self.num_prefix_tokens = num_prefix_tokens
        self.carry = carry
        # Per-sample adapter names of a mixed-center batch, set by `VisualPromptModel` for one forward pass.
        self.adapter_names: list[str] | None = None
        self._active_adapter: list[str] = []
        self.merged_adapters: list[str] = []
        self._install(block)

    # ----------------------------------------------------------------- adapters
    def update_layer(self, adapter_name: str, config: VisualPromptConfig, role: str, hidden_size: int) -> None:
        """Add an adapter: prompts `(num_virtual_tokens, hidden_size)` where it inserts, nothing where it carries."""
        if role not in PROMPT_ROLES:
            raise ValueError(f"role must be one of {PROMPT_ROLES}, got {role!r}.")
        self.vpt_role[adapter_name] = role
        self.vpt_dropout[adapter_name] = config.prompt_dropout
        if role != "carry":
            prompt = torch.empty(config.num_virtual_tokens, hidden_size)
            if config.prompt_init == "vpt":
                bound = math.sqrt(6.0 / (3 * config.patch_size**2 + hidden_size))
                nn.init.uniform_(prompt, -bound, bound)
            else:
                nn.init.normal_(prompt, std=0.02)
            self.vpt_prompt[adapter_name] = nn.Parameter(prompt)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def merge(self, *args, **kwargs) -> None:
        raise ValueError("Visual prompts add tokens to the sequence and cannot be merged into the weights.")

    def unmerge(self) -> None:
        pass

    # ----------------------------------------------------------------- block patching
    def _install(self, block: nn.Module) -> None:
        # A bound method on the instance: deepcopy rebinds it to the copy, and torch.compile traces through it.
        block.forward = types.MethodType(_prompted_block_forward, block)
        bias = getattr(block, "relative_position_bias", None)
        if bias is not None:
            bias.forward = types.MethodType(_padded_relative_position_bias_forward, bias)
            bias.num_prefix_tokens = self.num_prefix_tokens

    @staticmethod
    def uninstall(block: nn.Module) -> None:
        """Restore the block's own forward and remove its prompt layer."""
        block.__dict__.pop("forward", None)
        bias = getattr(block, "relative_position_bias", None)
        if bias is not None:
            bias.__dict__.pop("forward", None)
            bias.__dict__.pop("num_prefix_tokens", None)
        del block.visual_prompt

    # ----------------------------------------------------------------- forward
    def _row_adapters(self, batch_size: int) -> list[str | None] | None:
        """The adapter that prompts each sample at this block (None: no prompt), or None when nothing prompts."""
        if self.disable_adapters:
            return None
        if self.adapter_names is not None:
            return [name if name in self.vpt_role else None for name in self.adapter_names]
        active = [name for name in self.active_adapters if name in self.vpt_role]
        if not active:
            return None
        if len(active) > 1:
            raise ValueError(
                f"Visual prompts run one adapter at a time, got active adapters {active}; pass "
                "`adapter_names=[...]` (one per sample) to mix centers in a batch."
            )
        return [active[0]] * batch_size

    def _prompt_tokens(self, rows: list[str], row_index: torch.Tensor) -> torch.Tensor:
        """Prompts for the given samples, (len(rows), num_virtual_tokens, hidden); row_index: their batch rows."""
        names = sorted(set(rows))
        sizes = {n: self.vpt_prompt[n].shape[0] if n in self.vpt_prompt else self.carry.tokens.shape[1] for n in names}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"A mixed batch needs the same num_virtual_tokens for every adapter, got {sizes}.")
        if len(names) == 1 and self.vpt_role[names[0]] != "carry":
            # One center: expand one tensor rather than stacking per sample.
            prompts = self.vpt_prompt[names[0]].unsqueeze(0).expand(len(rows), -1, -1)
        elif len(names) == 1:
            prompts = self.carry.tokens[row_index]
        else:
            prompts = torch.stack(
                [
                    self.vpt_prompt[name] if self.vpt_role[name] != "carry" else self.carry.tokens[row_index[i]]
                    for i, name in enumerate(rows)
                ]
            )
        # Dropout applies to freshly inserted prompts only, with one mask per sample.
        inserting = [name for name in names if self.vpt_role[name] != "carry"]
        p = max((self.vpt_dropout[name] for name in inserting), default=0.0)
        if self.training and p > 0:
            inserted = torch.tensor([self.vpt_role[name] != "carry" for name in rows], device=prompts.device)
            prompts = torch.where(inserted[:, None, None], nn.functional.dropout(prompts, p=p), prompts)
        return prompts

    def forward(self, block: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The block's forward with prompts: insert after the prefix tokens, run the block, strip them."""
        batch_size = hidden_states.shape[0]
        row_adapters = self._row_adapters(batch_size)
        block_forward = type(block).forward
        if row_adapters is None or all(name is None for name in row_adapters):
            return block_forward(block, hidden_states, *args, **kwargs)

        prompted = [i for i, name in enumerate(row_adapters) if name is not None]
        if len(prompted) == batch_size:
            row_index = torch.arange(batch_size, device=hidden_states.device)
            prompts = self._prompt_tokens(row_adapters, row_index).to(hidden_states.dtype)
            output, prompt_output = self._run_with_prompts(block_forward, block, hidden_states, prompts, args, kwargs)
            self.carry.tokens = prompt_output
            return output

        # Some samples take no prompts here ("__base__", or an adapter that does not prompt this block): run them
        # as their own group through the same block, so they see exactly the base computation.
        plain = [i for i, name in enumerate(row_adapters) if name is None]
        prompted_index = torch.tensor(prompted, device=hidden_states.device)
        plain_index = torch.tensor(plain, device=hidden_states.device)
        prompts = self._prompt_tokens([row_adapters[i] for i in prompted], prompted_index).to(hidden_states.dtype)
        p_args, p_kwargs = _select_rows(args, kwargs, prompted_index, batch_size)
        # The block's own update layers (MLP updates) route each group's rows.
        with routed_rows(block, [self.adapter_names[i] for i in prompted]):
            output_p, prompt_output = self._run_with_prompts(
                block_forward, block, hidden_states[prompted_index], prompts, p_args, p_kwargs
            )
        n_args, n_kwargs = _select_rows(args, kwargs, plain_index, batch_size)
        with routed_rows(block, [self.adapter_names[i] for i in plain]):
            output_n = block_forward(block, hidden_states[plain_index], *n_args, **n_kwargs)
        if isinstance(output_n, tuple):
            output_n = output_n[0]
        order = torch.argsort(torch.cat([prompted_index, plain_index]))
        carried = prompt_output.new_zeros(batch_size, *prompt_output.shape[1:])
        self.carry.tokens = carried.index_copy(0, prompted_index, prompt_output)
        return torch.cat([output_p, output_n])[order]

    def _run_with_prompts(self, block_forward, block, hidden_states, prompts, args, kwargs):
        k, num_prompts = self.num_prefix_tokens, prompts.shape[1]
        x = torch.cat([hidden_states[:, :k], prompts, hidden_states[:, k:]], dim=1)
        args, kwargs = _pad_attention_masks(args, kwargs, hidden_states.shape[1], k, num_prompts)
        output = block_forward(block, x, *args, **kwargs)
        if isinstance(output, tuple):
            output = output[0]
        return torch.cat([output[:, :k], output[:, k + num_prompts :]], dim=1), output[:, k : k + num_prompts]

    def __repr__(self) -> str:
        return "visual_prompt." + super().__repr__()


def _prompted_block_forward(block: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    return block.visual_prompt(block, hidden_states, *args, **kwargs)


def _padded_relative_position_bias_forward(
    bias_module: nn.Module, window_size, interpolate_pos_encoding=False, dim_size=None
):
    """BEiT's relative position bias, computed for the patch tokens and zero-padded for the prompt tokens.

    The block asks for a bias of its sequence length (`dim_size`, prompts included); the prompts have no position,
    so they get no bias. The number of prompts is read off the shapes, so a gradient-checkpointing replay works too.
    """
    num_tokens = window_size[0] * window_size[1] + 1
    bias = type(bias_module).forward(bias_module, window_size, interpolate_pos_encoding, dim_size=num_tokens)
    if dim_size is None or dim_size == bias.shape[-1]:
        return bias
    return _pad_square(bias, bias_module.num_prefix_tokens, dim_size - bias.shape[-1])


def _pad_square(mask: torch.Tensor, k: int, num_prompts: int) -> torch.Tensor:
    """Insert `num_prompts` neutral rows/columns at position k of the last two dims (additive zeros / True)."""
    fill = True if mask.dtype == torch.bool else 0.0
    *lead, rows, cols = mask.shape
    if cols > 1:
        pad = mask.new_full((*lead, rows, num_prompts), fill)
        mask = torch.cat([mask[..., :k], pad, mask[..., k:]], dim=-1)
    if rows > 1:
        pad = mask.new_full((*lead, num_prompts, mask.shape[-1]), fill)
        mask = torch.cat([mask[..., :k, :], pad, mask[..., k:, :]], dim=-2)
    return mask


def _pad_attention_masks(args, kwargs, seq_len: int, k: int, num_prompts: int):
    """Pad every 4D mask/bias over the token sequence (…, N, N) or (…, 1, N) for the inserted prompts."""

    def pad(value):
        if isinstance(value, torch.Tensor) and value.ndim == 4 and value.shape[-1] == seq_len:
            return _pad_square(value, k, num_prompts)
        return value

    return tuple(pad(a) for a in args), {name: pad(v) for name, v in kwargs.items()}


def _select_rows(args, kwargs, index: torch.Tensor, batch_size: int):
    """Select the given samples of every per-sample 4D mask (masks broadcast over the batch are kept as they are)."""

    def select(value):
        if isinstance(value, torch.Tensor) and value.ndim == 4 and value.shape[0] == batch_size and batch_size > 1:
            return value[index]
        return value

    return tuple(select(a) for a in args), {name: select(v) for name, v in kwargs.items()}
