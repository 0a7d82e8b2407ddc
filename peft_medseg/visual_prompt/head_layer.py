"""The head update layer: a per-center low-rank 1x1 (1x1x1 in 3D) update of a decode-head convolution, next to the
prompts.

Prompts adapt what the encoder computes; on real center pairs much of the adaptation that full fine-tuning finds
sits in the decode head (README, "What we measured"). `head_rank > 0` gives each center, in the same adapter, a
low-rank update of every head convolution: `conv(x) + up(down(x))`, with `down` a 1x1 convolution to `head_rank`
channels (the conv's stride) and `up` a 1x1 convolution back, initialised to zero so a new adapter starts as the base.
Mixed-center batches route it per sample, like the prompts. With `head_depthwise`, each center also gets a
depthwise 3x3 (3x3x3) filter on the updated conv's output, `y + depthwise(y)`, starting at zero: a per-channel spatial
change of the head, which a 1x1 update cannot make.

Where the conv's kernel is centred ("same" padding, odd kernel, no dilation or groups: every conv of UperNet's and
UNETR's heads) the update is folded into the conv's weight at the kernel's centre tap, `conv(x; W + up·down)`: the
same output, one convolution, and no extra full-size feature maps kept for the backward pass (in 3D these are
56 MB each at 96³).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .update_layer import LowRankUpdateLayer


class HeadUpdateLayer(LowRankUpdateLayer):
    """Low-rank updates of one convolution for every adapter; a child of the conv (`conv.head_update`), whose
    `forward` is overridden on the instance to add the update of each sample's adapter."""

    adapter_layer_names = ("vpt_down", "vpt_up", "vpt_depthwise")
    host_attribute = "head_update"

    def __init__(self, conv: nn.Conv2d | nn.Conv3d) -> None:
        super().__init__(conv, _updated_conv_forward)
        self.conv_class = nn.Conv3d if isinstance(conv, nn.Conv3d) else nn.Conv2d
        self.vpt_depthwise = nn.ModuleDict({})
        self.in_channels, self.out_channels, self.stride = conv.in_channels, conv.out_channels, conv.stride
        self.folds_into_weight = _centre_tap_conv(conv)

    def update_layer(self, adapter_name: str, rank: int, depthwise: bool = False) -> None:
        """Add an adapter's update of rank `rank`, with a depthwise 3x3 filter of its output when `depthwise` (`up`
        and the filter start at zero: the adapter starts as the base)."""
        down = self.conv_class(self.in_channels, rank, 1, stride=self.stride, bias=False)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))  # as LoRA's A
        up = self.conv_class(rank, self.out_channels, 1, bias=False)
        nn.init.zeros_(up.weight)
        self.vpt_down[adapter_name] = down
        self.vpt_up[adapter_name] = up
        if depthwise:
            channels = self.out_channels
            filter_ = self.conv_class(channels, channels, 3, padding=1, groups=channels, bias=False)
            nn.init.zeros_(filter_.weight)
            self.vpt_depthwise[adapter_name] = filter_
        self.set_adapter(self.active_adapters)

    def _updated(self, conv: nn.Conv2d | nn.Conv3d, name: str, x: torch.Tensor) -> torch.Tensor:
        output = self._low_rank_updated_conv(conv, name, x)
        if name in self.vpt_depthwise:
            output = output + self.vpt_depthwise[name](output)
        return output

    def _low_rank_updated_conv(self, conv: nn.Conv2d | nn.Conv3d, name: str, x: torch.Tensor) -> torch.Tensor:
        down, up = self.vpt_down[name], self.vpt_up[name]
        if not self.folds_into_weight:
            return type(conv).forward(conv, x) + up(down(x))
        # up·down as a kernel that is zero but at the centre tap, added to the conv's own kernel.
        update = (up.weight.flatten(1) @ down.weight.flatten(1)).view(*conv.weight.shape[:2], *[1] * (x.ndim - 2))
        centre = [k // 2 for k in reversed(conv.kernel_size) for _ in range(2)]
        weight = conv.weight + F.pad(update.to(conv.weight.dtype), centre)
        convolution = F.conv3d if x.ndim == 5 else F.conv2d
        return convolution(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _updated_conv_forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return conv.head_update(conv, x)


def _centre_tap_conv(conv: nn.Conv2d | nn.Conv3d) -> bool:
    """Whether a 1x1 conv of `x` with the conv's stride lands on the conv's own output grid at its kernel's centre
    (odd kernel, padding of half the kernel, zero padding, no dilation, no groups): then the update folds into the
    kernel's centre tap."""
    padding = conv.padding if conv.padding != "same" else tuple(k // 2 for k in conv.kernel_size)
    return (
        conv.groups == 1
        and conv.padding_mode == "zeros"
        and all(d == 1 for d in conv.dilation)
        and all(k % 2 == 1 for k in conv.kernel_size)
        and tuple(padding) == tuple(k // 2 for k in conv.kernel_size)
    )
