"""`LowRankUpdateLayer`: a per-center low-rank update of one frozen module of the base, routed per sample.

Two kinds share it: `HeadUpdateLayer` (head_layer.py) updates the decode head's convolutions, `MlpUpdateLayer`
(mlp_layer.py) the MLP output projection of each prompted transformer block. The updated module keeps its own
weights; its forward, overridden on the instance, asks its update layer for each sample's output.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


class LowRankUpdateLayer(nn.Module, BaseTunerLayer):
    """Per-adapter low-rank updates `up·down` of one module (`vpt_down`, `vpt_up`: one pair per adapter, `up`
    starting at zero so that a new adapter starts as the base); a child of the module, under `host_attribute`.

    In a mixed-center batch each sample takes its adapter's update (none for `"__base__"` rows): `adapter_names`
    holds the adapter of each row of the module's input while `model(..., adapter_names=[...])` runs.
    """

    adapter_layer_names: tuple[str, ...] = ("vpt_down", "vpt_up")
    other_param_names = ()
    # The attribute of the updated module that holds this layer (and names its tensors in adapter files).
    host_attribute = ""

    def __init__(self, module: nn.Module, forward: Callable) -> None:
        super().__init__()
        self.vpt_down = nn.ModuleDict({})
        self.vpt_up = nn.ModuleDict({})
        self.adapter_names: list[str] | None = None
        self._active_adapter: list[str] = []
        self.merged_adapters: list[str] = []
        # A bound method on the instance: deepcopy rebinds it to the copy; `uninstall` restores the class forward.
        module.forward = types.MethodType(forward, module)

    def merge(self, *args, **kwargs) -> None:
        raise ValueError(
            f"The {self.host_attribute} of a visual prompt adapter is not merged; use unload() to get the base back."
        )

    def unmerge(self) -> None:
        pass

    @classmethod
    def uninstall(cls, module: nn.Module) -> None:
        """Restore the module's own forward and remove its update layer."""
        module.__dict__.pop("forward", None)
        delattr(module, cls.host_attribute)

    def _row_adapters(self, batch_size: int) -> list[str | None] | None:
        if self.disable_adapters:
            return None
        if self.adapter_names is not None:
            if len(self.adapter_names) != batch_size:
                # Fails loudly rather than give a sample another center's update.
                raise RuntimeError(
                    f"{self.host_attribute}: {len(self.adapter_names)} adapter names for an input of {batch_size} "
                    "rows; a module that splits the batch must route its groups with `routed_rows`."
                )
            return [name if name in self.vpt_down else None for name in self.adapter_names]
        active = [name for name in self.active_adapters if name in self.vpt_down]
        return [active[0]] * batch_size if len(active) == 1 else None

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The module's output for `x`, each sample with its adapter's update (none for `"__base__"` rows)."""
        row_adapters = self._row_adapters(x.shape[0])
        if row_adapters is None or all(name is None for name in row_adapters):
            return type(module).forward(module, x)
        names = list(dict.fromkeys(row_adapters))
        if len(names) == 1:
            return self._updated(module, names[0], x)
        # A mixed batch: each adapter's rows through their own updated module, base rows through the module itself.
        outputs, index = [], []
        for name in names:
            rows = torch.tensor([i for i, n in enumerate(row_adapters) if n == name], device=x.device)
            outputs.append(
                type(module).forward(module, x[rows]) if name is None else self._updated(module, name, x[rows])
            )
            index.append(rows)
        return torch.cat(outputs)[torch.argsort(torch.cat(index))]

    def _updated(self, module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
        """The module's output for `x` with adapter `name`'s update: each kind of update layer defines it."""
        raise NotImplementedError(f"{type(self).__name__} must define how its update changes the module's output.")

    def __repr__(self) -> str:
        return f"{self.host_attribute}." + super().__repr__()


@contextmanager
def routed_rows(module: nn.Module, adapter_names: list[str]) -> Iterator[None]:
    """Route the update layers inside `module` for a call on a subset of a mixed batch's rows (`adapter_names`: the
    adapter of each of those rows), restoring the whole batch's routing afterwards. A prompted block that runs its
    prompted and unprompted samples as separate groups calls it around each group."""
    layers = [m for m in module.modules() if isinstance(m, LowRankUpdateLayer)]
    saved = [layer.adapter_names for layer in layers]
    for layer in layers:
        layer.adapter_names = list(adapter_names)
    try:
        yield
    finally:
        for layer, names in zip(layers, saved):
            layer.adapter_names = names
