"""The head update layer: a per-center low-rank 1x1 (1x1x1 in 3D) update of a decode-head convolution, next to the
prompts.

Prompts adapt what the encoder computes; on real center pairs much of the adaptation that full fine-tuning finds
sits in the decode head (README, "What we measured"). `head_rank > 0` gives each center, in the same adapter, a
low-rank update of every head convolution: `conv(x) + up(down(x))`, with `down` a 1x1 convolution to `head_rank`
channels (the conv's stride) and `up` a 1x1 convolution back, initialised to zero so a new adapter starts as the base.
Mixed-center batches route it per sample, like the prompts.
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


class HeadUpdateLayer(nn.Module, BaseTunerLayer):
    """Low-rank updates of one convolution for every adapter; a child of the conv (`conv.head_update`), whose
    `forward` is overridden on the instance to add the update of each sample's adapter."""

    adapter_layer_names = ("vpt_down", "vpt_up")
    other_param_names = ()

    def __init__(self, conv: nn.Conv2d | nn.Conv3d) -> None:
        super().__init__()
        self.conv_class = nn.Conv3d if isinstance(conv, nn.Conv3d) else nn.Conv2d
        self.vpt_down = nn.ModuleDict({})
        self.vpt_up = nn.ModuleDict({})
        self.in_channels, self.out_channels, self.stride = conv.in_channels, conv.out_channels, conv.stride
        # Per-sample adapter names of a mixed-center batch, set by `VisualPromptModel` for one forward pass.
        self.adapter_names: list[str] | None = None
        self._active_adapter: list[str] = []
        self.merged_adapters: list[str] = []
        # A bound method on the instance: deepcopy rebinds it to the copy; `uninstall` restores the class forward.
        conv.forward = types.MethodType(_updated_conv_forward, conv)

    def update_layer(self, adapter_name: str, rank: int) -> None:
        """Add an adapter's update of rank `rank` (`up` starts at zero: the adapter starts as the base)."""
        down = self.conv_class(self.in_channels, rank, 1, stride=self.stride, bias=False)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))  # as LoRA's A
        up = self.conv_class(rank, self.out_channels, 1, bias=False)
        nn.init.zeros_(up.weight)
        self.vpt_down[adapter_name] = down
        self.vpt_up[adapter_name] = up
        self.set_adapter(self.active_adapters)

    def merge(self, *args, **kwargs) -> None:
        raise ValueError(
            "The head update of a visual prompt adapter is not merged; use unload() to get the base back."
        )

    def unmerge(self) -> None:
        pass

    @staticmethod
    def uninstall(conv: nn.Module) -> None:
        """Restore the conv's own forward and remove its update layer."""
        conv.__dict__.pop("forward", None)
        del conv.head_update

    def _row_adapters(self, batch_size: int) -> list[str | None] | None:
        if self.disable_adapters:
            return None
        if self.adapter_names is not None:
            return [name if name in self.vpt_down else None for name in self.adapter_names]
        active = [name for name in self.active_adapters if name in self.vpt_down]
        return [active[0]] * batch_size if len(active) == 1 else None

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """`output` (the conv's own) plus, for each sample, its adapter's update of `x`."""
        row_adapters = self._row_adapters(x.shape[0])
        if row_adapters is None or all(name is None for name in row_adapters):
            return output
        names = [name for name in dict.fromkeys(row_adapters) if name is not None]
        if len(names) == 1 and None not in row_adapters:
            return output + self.vpt_up[names[0]](self.vpt_down[names[0]](x))
        update = torch.zeros_like(output)
        for name in names:
            rows = torch.tensor([i for i, n in enumerate(row_adapters) if n == name], device=x.device)
            update = update.index_add(0, rows, self.vpt_up[name](self.vpt_down[name](x[rows])))
        return output + update

    def __repr__(self) -> str:
        return "head_update." + super().__repr__()


def _updated_conv_forward(conv: nn.Conv2d, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return conv.head_update(x, type(conv).forward(conv, x, *args, **kwargs))
