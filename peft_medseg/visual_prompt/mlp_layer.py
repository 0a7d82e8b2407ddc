"""The MLP update layer: a per-center low-rank update of the output projection of each prompted block's MLP.

Prompts change what a block's attention reads; they cannot change what its MLP computes from it. On real center
pairs full fine-tuning moves the encoder's MLPs most (more than half of the encoder's squared weight change on
`breast_us`; README, "Real shift"). `mlp_rank > 0` gives each center, in the same adapter, a low-rank update of
every prompted block's MLP output projection, `fc2(x; W + up·down)`, with `up` starting at zero so that a new
adapter starts as the base. Mixed batches route it per sample, like the prompts.

The update is added beside the projection, as LoRA adds it, `fc2(x) + up(down(x))`, not folded into its weight as the
head update is. A folded weight is a new (out, in) tensor that every block keeps for its backward pass: without
activation checkpointing, 27 MB at ViT-S widths (224 px, batch 8) and 108 MB for the paper's UNETR at 96³ (measured),
where one block's folded weight is larger than its hidden activations. Added beside it, a block keeps only `down(x)`,
one value per token and rank (README, "Speed and memory").
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .update_layer import LowRankUpdateLayer


class MlpUpdateLayer(LowRankUpdateLayer):
    """Low-rank updates of one `nn.Linear` for every adapter; a child of the Linear (`linear.mlp_update`), whose
    `forward` is overridden on the instance to add the update of each sample's adapter."""

    host_attribute = "mlp_update"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear, _updated_linear_forward)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def update_layer(self, adapter_name: str, rank: int) -> None:
        """Add an adapter's update of rank `rank` (`up` starts at zero: the adapter starts as the base)."""
        down = nn.Linear(self.in_features, rank, bias=False)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))  # as LoRA's A
        up = nn.Linear(rank, self.out_features, bias=False)
        nn.init.zeros_(up.weight)
        self.vpt_down[adapter_name] = down
        self.vpt_up[adapter_name] = up
        self.set_adapter(self.active_adapters)

    def _updated(self, linear: nn.Linear, name: str, x: torch.Tensor) -> torch.Tensor:
        down, up = self.vpt_down[name].weight.to(x.dtype), self.vpt_up[name].weight.to(x.dtype)
        return F.linear(x, linear.weight, linear.bias) + F.linear(F.linear(x, down), up)


def _updated_linear_forward(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear.mlp_update(linear, x)
