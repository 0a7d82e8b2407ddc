"""`VisualPromptModel`: the peft tuner that injects visual prompts into a frozen vision transformer."""

from __future__ import annotations

import re
import types
import warnings
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial

import torch
from peft.tuners.tuners_utils import BaseTuner, _get_submodules
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

from .architectures import (
    DEEP_KEY_VALUE_BLOCKS,
    attention_width,
    describe_base,
    describe_key_value_base,
    find_blocks,
    is_monai_model,
    mlp_output_targets,
)
from .config import VisualPromptConfig
from .head_layer import HeadUpdateLayer
from .kv_layer import DeepKeyValuePromptLayer, KeyValuePromptLayer, key_value_targets
from .layer import BASE_ADAPTER_NAME, PromptCarry, VisualPromptLayer
from .mlp_layer import MlpUpdateLayer
from .update_layer import LowRankUpdateLayer

# The kinds of low-rank update layer an adapter may hold, each under its own attribute of the updated module.
UPDATE_LAYER_CLASSES = (HeadUpdateLayer, MlpUpdateLayer)

# Fields resolved from the base; a mismatch with a loaded adapter means the prompts would mean nothing there.
ARCHITECTURE_FIELDS = (
    "num_labels",
    "block_class",
    "hidden_size",
    "num_blocks",
    "num_prefix_tokens",
    "patch_size",
    "base_fingerprint",
)


class VisualPromptModel(BaseTuner):
    """
    Visual prompt tuning (VPT) of a vision transformer segmentation model: learnable prompt tokens join the token
    sequence of the encoder's blocks while every base weight stays frozen.

    Use it through peft, after `import peft_medseg`:

    ```py
    >>> import peft_medseg
    >>> from peft import get_peft_model
    >>> model = get_peft_model(base, peft_medseg.VisualPromptConfig(num_virtual_tokens=10, deep=True))
    >>> model.print_trainable_parameters()
    ```

    With `prompt_mode="key_value"` the prompts join the keys and values of the encoder's attention layers instead
    (SegFormer, Swin; see `VisualPromptConfig`).

    Several centers share one base: `add_adapter`/`load_adapter` add one adapter per center, `set_adapter` switches,
    and `model(pixel_values=x, adapter_names=["center-A", "center-B", "__base__", ...])` mixes centers within one
    batch, in inference and in training, in one pass through the encoder.
    """

    prefix: str = "vpt_"
    # Every layer kind of an adapter (prompts; head and MLP updates): peft only ever tests
    # isinstance(module, tuner_layer_cls) (set_adapter, delete_adapter, freezing), which takes a tuple.
    tuner_layer_cls = (VisualPromptLayer, LowRankUpdateLayer)
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model, peft_config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self._carry = PromptCarry()
        # The per-sample adapter names of the mixed batch whose forward pass is running (None outside one).
        self._adapter_names_in_flight: list[str] | None = None
        self._targets: dict[str, str] = {}
        # Key/value mode: attention module name -> (the norm that feeds its key/value projections, attention layout).
        self._key_value_targets: dict[str, tuple[nn.Module, str]] = {}
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # ----------------------------------------------------------------- injection
    def _prepare_adapter_config(self, peft_config: VisualPromptConfig, model_config: dict) -> VisualPromptConfig:
        return peft_config

    def _prepare_model(self, peft_config: VisualPromptConfig, model: nn.Module) -> None:
        # Runs before any module is touched: every check that can fail happens here.
        block_class, blocks = find_blocks(model, peft_config.target_modules, peft_config.prompt_mode)
        base = _describe(model, peft_config, block_class, blocks)
        check_base_compatible(model, peft_config, base)
        for field_name, value in base.items():
            setattr(peft_config, field_name, value)
        peft_config.target_modules = [block_class]

        num_blocks = len(blocks)
        layers = (
            peft_config.layers
            if peft_config.layers is not None
            else (list(range(num_blocks)) if peft_config.deep else [0])
        )
        out_of_range = [i for i in layers if not 0 <= i < num_blocks]
        if out_of_range:
            raise ValueError(
                f"layers={peft_config.layers}: {out_of_range} outside 0..{num_blocks - 1} ({block_class})."
            )
        if peft_config.prompt_mode == "key_value":
            # Prompts join the attention inside each chosen block (the config allows deep prompts only).
            self._key_value_targets = key_value_targets(block_class, blocks, layers)
            self._targets = {name: "insert" for name in self._key_value_targets}
        elif peft_config.deep:
            self._targets = {blocks[i][0]: "insert" for i in layers}
        else:
            # Shallow prompts enter once and are carried by every later block.
            first = layers[0]
            self._targets = {
                name: "start" if i == first else "carry" for i, (name, _) in enumerate(blocks) if i >= first
            }
        if peft_config.head_rank:
            heads = head_update_targets(model, peft_config)
            # With head_depthwise, "head+filter" marks the convs that also get the depthwise filter.
            filtered = set(depthwise_filter_targets(model, heads)) if peft_config.head_depthwise else set()
            self._targets |= {name: "head+filter" if name in filtered else "head" for name in heads}
        if peft_config.mlp_rank:
            self._targets |= {name: "mlp" for name in mlp_output_targets(block_class, blocks, layers)}

    def _check_target_module_exists(self, peft_config: VisualPromptConfig, key: str) -> bool:
        return key in self._targets

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        role = self._targets[current_key]
        if role == "mlp":
            layer = self._update_layer(target, MlpUpdateLayer)
            layer.update_layer(adapter_name, peft_config.mlp_rank)
            layer.to(target.weight.device)
            return
        if role in ("head", "head+filter"):
            layer = self._update_layer(target, HeadUpdateLayer)
            layer.update_layer(adapter_name, peft_config.head_rank, role == "head+filter")
            layer.to(target.weight.device)
            return
        layer = getattr(target, "visual_prompt", None)
        if peft_config.prompt_mode == "key_value":
            # `target` is an attention module; its prompts have its own width (stages differ in hierarchical models).
            if layer is None:
                norm, layout = self._key_value_targets[current_key]
                layer = KeyValuePromptLayer(target, norm, layout)
                target.visual_prompt = layer
                layer.set_adapter(self.active_adapters)
            layer.update_layer(adapter_name, peft_config, "insert", attention_width(target))
        else:
            if layer is None:
                spec = DEEP_KEY_VALUE_BLOCKS.get(type(target).__name__)
                if spec is not None:
                    # Deep prompts here run as keys/values of the block's attention (same parameters and outputs).
                    layer = DeepKeyValuePromptLayer(target, peft_config.num_prefix_tokens, self._carry, spec)
                else:
                    layer = VisualPromptLayer(target, peft_config.num_prefix_tokens, self._carry)
                target.visual_prompt = layer
                layer.set_adapter(self.active_adapters)
            layer.update_layer(adapter_name, peft_config, self._targets[current_key], peft_config.hidden_size)
        # Prompts live on the device of their block.
        device = next(target.parameters()).device
        layer.to(device)

    def _update_layer(self, target: nn.Module, layer_class: type[LowRankUpdateLayer]) -> LowRankUpdateLayer:
        """The update layer of `target`, created on the first adapter that updates it."""
        layer = getattr(target, layer_class.host_attribute, None)
        if layer is None:
            layer = layer_class(target)
            setattr(target, layer_class.host_attribute, layer)
            layer.set_adapter(self.active_adapters)
        return layer

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """peft's injection, all or nothing: on any error the model is left exactly as it was before the call."""
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except BaseException:
            self.roll_back(adapter_name)
            raise

    def roll_back(self, adapter_name: str) -> None:
        """Take `adapter_name` out again after a failed injection or load, leaving the other adapters as they were.

        With no other adapter, the base gets its own modules and forwards back (as `unload()`), so a failed
        `PeftModel.from_pretrained(base, ...)` leaves the caller's `base` untouched.
        """
        others = [name for name in self.peft_config if name != adapter_name]
        if not others:
            self._unload_and_optionally_merge(merge=False)
            self.peft_config.pop(adapter_name, None)
            return
        active = [name for name in self.active_adapters if name != adapter_name] or others[:1]
        for module in self.model.modules():
            if isinstance(module, self.tuner_layer_cls):
                module.delete_adapter(adapter_name)
            elif isinstance(module, AuxiliaryTrainingWrapper):
                module.delete_adapter(adapter_name, new_active_adapters=active)
        self.peft_config.pop(adapter_name, None)
        self.set_adapter(active)

    # ----------------------------------------------------------------- unloading
    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            raise ValueError(
                "Visual prompts add tokens to the sequence and cannot be merged into the base weights; use "
                "`unload()` to get the base model back."
            )
        prompted = [
            m for m in self.model.modules() if isinstance(getattr(m, "visual_prompt", None), VisualPromptLayer)
        ]
        for module in prompted:  # blocks (token-level prompts) and attention modules (key/value prompts)
            type(module.visual_prompt).uninstall(module)
        for layer_class in UPDATE_LAYER_CLASSES:
            attribute = layer_class.host_attribute
            for module in [m for m in self.model.modules() if isinstance(getattr(m, attribute, None), layer_class)]:
                layer_class.uninstall(module)
        # The base is shared by every center, so unloading gives back the original modules, not one center's trained
        # copies (peft's LoRA keeps the active copy of a modules_to_save module instead).
        wrappers = [name for name, m in self.model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)]
        for name in wrappers:
            parent, wrapper, child_name = _get_submodules(self.model, name)
            setattr(parent, child_name, wrapper.original_module)
        if "peft_config" in self.model.__dict__:
            del self.model.peft_config
        return self.model

    # ----------------------------------------------------------------- loading
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        # peft loads non-strictly; a missing or mis-shaped prompt would silently stay random. Refuse instead.
        expected = {
            name: param.shape
            for name, param in model.named_parameters()
            if (".visual_prompt.vpt_prompt." in name and name.endswith(f".{adapter_name}"))
            or (any(f".{c.host_attribute}.vpt_" in name for c in UPDATE_LAYER_CLASSES) and f".{adapter_name}." in name)
        }
        missing = sorted(name for name in expected if name not in remapped)
        # Every tensor, prompts and modules_to_save copies alike (a classifier saved for another num_labels).
        current = {name: tensor.shape for name, tensor in model.state_dict().items()}
        # A tensor with no place in the model would be dropped silently: e.g. a depthwise filter of a pyramid-pooling
        # conv, saved before those convs stopped getting one, would leave the loaded adapter computing otherwise.
        unexpected = sorted(name for name in remapped if name not in current)
        wrong = {
            n: (tuple(tensor.shape), tuple(current[n]))
            for n, tensor in remapped.items()
            if n in current and tensor.shape != current[n]
        }
        if missing or wrong or unexpected:
            model.base_model.roll_back(adapter_name)
            raise ValueError(
                f"The weights of adapter {adapter_name!r} do not fit its config: "
                + (f"missing prompt tensors {missing[:3]}{' …' if len(missing) > 3 else ''}. " if missing else "")
                + (
                    f"tensors the model has no place for {unexpected[:3]}{' …' if len(unexpected) > 3 else ''}. "
                    if unexpected
                    else ""
                )
                + (f"shape (found, expected) {wrong}." if wrong else "")
            )
        return remapped

    # ----------------------------------------------------------------- mixed batches
    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        adapter_names = list(adapter_names)
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER_NAME} - set(self.peft_config))
        if unknown:
            raise ValueError(
                f"adapter_names contains unknown adapter(s) {unknown}; available: {sorted(self.peft_config)} and "
                f"{BASE_ADAPTER_NAME!r} for the base model."
            )
        pixel_values = kwargs.get("pixel_values", args[0] if args else None)
        if isinstance(pixel_values, torch.Tensor) and len(adapter_names) != pixel_values.shape[0]:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries for a batch of {pixel_values.shape[0]} samples."
            )
        layers = [m for m in self.model.modules() if isinstance(m, self.tuner_layer_cls)]
        # modules_to_save copies are routed here rather than by peft, which routes only leaf Linear/Conv/Embedding
        # modules: a center's own BatchNorm copy (statistics included) must route per sample too.
        wrappers = [m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper)]
        handles = [
            module.register_forward_pre_hook(
                partial(_inject_adapter_names, adapter_names=adapter_names), with_kwargs=True
            )
            for module in self.model.modules()
            if isinstance(module, AuxiliaryTrainingWrapper) and not isinstance(module, ModulesToSaveWrapper)
        ]
        for layer in layers:
            layer.adapter_names = adapter_names
        for wrapper in wrappers:
            wrapper.forward = types.MethodType(partial(_route_per_sample, adapter_names=adapter_names), wrapper)
        self._adapter_names_in_flight = adapter_names
        try:
            yield
        finally:
            self._adapter_names_in_flight = None
            for layer in layers:
                layer.adapter_names = None
            for wrapper in wrappers:
                wrapper.__dict__.pop("forward", None)
            for handle in handles:
                handle.remove()
            self._carry.tokens = None

    def checkpoint_context_fn(self) -> tuple[AbstractContextManager, AbstractContextManager]:
        """A `context_fn` for non-reentrant `torch.utils.checkpoint`: its recomputation in the backward pass routes
        the samples of a mixed-center batch to the adapters their forward pass used.

        The per-sample routing lives on the layers only while `model(..., adapter_names=...)` runs; a checkpointed
        module is recomputed later, in the backward pass, so it is routed again for the recomputation.
        """
        names = self._adapter_names_in_flight
        if names is None:
            return nullcontext(), nullcontext()
        # The update layers' routing as it is now: a prompted block that runs the batch's rows in groups routes
        # them per group (`routed_rows`), and a checkpointed module inside it is recomputed for that group.
        routing = {
            layer: layer.adapter_names for layer in self.model.modules() if isinstance(layer, LowRankUpdateLayer)
        }
        return nullcontext(), self._replay_routing(names, routing)

    @contextmanager
    def _replay_routing(self, adapter_names: list[str], routing: dict[LowRankUpdateLayer, list[str] | None]):
        with self._enable_peft_forward_hooks(adapter_names=adapter_names):
            for layer, names in routing.items():
                layer.adapter_names = names
            yield

    # ----------------------------------------------------------------- training mode
    def train(self, mode: bool = True):
        super().train(mode)
        keep_frozen_norms_in_eval(self.model)
        return self


def head_update_targets(model: nn.Module, config: VisualPromptConfig) -> list[str]:
    """Names of the `Conv2d`/`Conv3d` modules that get a head update (`config.head_rank > 0`), checked before
    injection. By default: every conv of the decode head, which is `decode_head` in transformers' models and, in
    MONAI's UNETR and Swin UNETR, everything outside the transformer encoder (`vit`, `swinViT`)."""
    saved = tuple(config.modules_to_save or ())
    # The base's own convs: not the updates of adapters loaded before, nor peft's copies of modules_to_save.
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Conv3d))
        and not any(part in name.split(".") for part in ("head_update", "modules_to_save", "original_module"))
    ]
    if config.head_modules is None:
        if is_monai_model(model):
            _, blocks = find_blocks(model, config.target_modules, config.prompt_mode)
            encoder = blocks[0][0].split(".")[0] + "."
            in_head = [n for n in names if not n.startswith(encoder)]
        else:
            in_head = [n for n in names if n.startswith("decode_head.")]
        chosen = [n for n in in_head if not any(n == s or n.startswith(s + ".") for s in saved)]
    else:
        chosen = [n for n in names if any(re.fullmatch(pattern, n) for pattern in config.head_modules)]
    clash = [n for n in chosen if any(n == s or n.startswith(s + ".") for s in saved)]
    if clash:
        raise ValueError(f"head_modules {clash} are also in modules_to_save: a module is updated or copied, not both.")
    if not chosen:
        where = config.head_modules or "the decode head (outside modules_to_save)"
        raise ValueError(f"head_rank={config.head_rank}, but {where} matches no Conv2d/Conv3d module of the base.")
    return chosen


def depthwise_filter_targets(model: nn.Module, head_targets: list[str]) -> list[str]:
    """The updated head convs that get the depthwise filter (`config.head_depthwise`): all of `head_targets` except
    those that act on an adaptively pooled map, such as UperNet's pyramid-pooling branches (1x1 to 6x6 summaries of
    the whole image, upsampled afterwards). There a 3x3 filter reads mostly padding and cannot sharpen a small lesion,
    the filter's purpose. Leaving them out brings the `tiny` base's adapter from 2.19% to 1.86% of the parameters,
    for 0.1-0.3 points of validation Dice, within the seeds' spread (README, "Real shift"). A conv acts on a pooled
    map when an `AdaptiveAvgPool`/`AdaptiveMaxPool` child of one of its ancestors is registered before the branch
    that holds it (modules run in the order they are registered in these heads: transformers' UperNet and BEiT
    pyramid-pooling blocks)."""
    pooling = (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
    pooled: set[str] = set()
    for name, module in model.named_modules():
        after_pooling = False
        for child_name, child in module.named_children():
            if isinstance(child, pooling):
                after_pooling = True
            elif after_pooling:
                branch = f"{name}.{child_name}" if name else child_name
                pooled |= {f"{branch}.{sub}" if sub else branch for sub, _ in child.named_modules()}
    return [name for name in head_targets if name not in pooled]


def keep_frozen_norms_in_eval(model: nn.Module) -> nn.Module:
    """Put every BatchNorm whose parameters are frozen back in eval mode (call after `model.train()`).

    A frozen BatchNorm would still update its running statistics in train mode; those buffers are not part of an
    adapter, so the shared base would drift and a reloaded adapter would give other outputs.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.eval()
    return model


def _route_per_sample(wrapper: ModulesToSaveWrapper, *args, adapter_names: list[str], **kwargs):
    """A modules_to_save wrapper's forward for a mixed batch: each group of samples through its center's copy.

    Samples of a center without a copy of this module, and `"__base__"` samples, take the original module. Groups run
    separately, so a BatchNorm copy in training normalises with its own center's batch statistics, exactly as in
    separate passes. Every input tensor with one row per sample is split, also inside tuples and lists (a whole decode
    head takes the encoder's feature maps, a 3D decoder block its skip connection); the outputs (a tensor, or a
    tuple/list of them) are put back in the batch's order.
    """
    if wrapper.disable_adapters:
        return wrapper.original_module(*args, **kwargs)
    batch = len(adapter_names)
    outputs, order = [], []
    for name in dict.fromkeys(adapter_names):
        rows = [i for i, n in enumerate(adapter_names) if n == name]
        module = wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.original_module
        outputs.append(module(*_take_rows(args, rows, batch), **_take_rows(kwargs, rows, batch)))
        order.extend(rows)
    return _join_rows(outputs, torch.argsort(torch.tensor(order)))


def _take_rows(value, rows: list[int], batch: int):
    """`value` with every tensor that has one row per sample cut to `rows`, looking into tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_take_rows(v, rows, batch) for v in value)
    if isinstance(value, dict):
        return {k: _take_rows(v, rows, batch) for k, v in value.items()}
    return value


def _join_rows(groups: list, inverse: torch.Tensor):
    """Concatenate the groups' outputs (tensors, or tuples/lists of them) and restore the batch's order."""
    first = groups[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(groups)[inverse.to(first.device)]
    if isinstance(first, (tuple, list)):
        return type(first)(_join_rows(list(parts), inverse) for parts in zip(*groups))
    raise TypeError(f"A module copied per center returned {type(first).__name__}; a mixed batch routes tensors only.")


def _inject_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def check_base_compatible(
    model: nn.Module, config: VisualPromptConfig, base: dict | None = None, strict: bool = False
) -> None:
    """Check that an adapter config fits a base model, before anything is modified.

    A different architecture (block class, hidden size, number of blocks, prefix tokens, patch size or the shapes of
    the prompted blocks) raises a `ValueError`. A different base checkpoint of the same architecture (the recorded
    `base_model_name_or_path`/`revision`) only warns, since fine-tuned bases are legitimate; `strict=True` raises.
    """
    if base is None:
        block_class, blocks = find_blocks(model, config.target_modules, config.prompt_mode)
        base = _describe(model, config, block_class, blocks)
    mismatched = {
        name: (getattr(config, name), base[name])
        for name in ARCHITECTURE_FIELDS
        if getattr(config, name) is not None and getattr(config, name) != base[name]
    }
    if mismatched:
        details = ", ".join(f"{name}: adapter {want!r} vs base {have!r}" for name, (want, have) in mismatched.items())
        raise ValueError(
            f"This visual prompt adapter was made for another base architecture ({details}). Load it onto the base "
            f"it was trained with ({config.base_model_name_or_path or 'see adapter_config.json'})."
        )
    recorded = config.base_model_name_or_path
    current = getattr(model, "name_or_path", None) or None
    if recorded and current and recorded != current:
        message = (
            f"This adapter was trained on base {recorded!r} but is being loaded onto {current!r}. The architectures "
            "match, but prompts trained for other weights can give wrong masks."
        )
        if strict:
            raise ValueError(message)
        warnings.warn(message, UserWarning, stacklevel=3)


def _describe(model: nn.Module, config: VisualPromptConfig, block_class: str, blocks) -> dict:
    describe = describe_key_value_base if config.prompt_mode == "key_value" else describe_base
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if num_labels is None and is_monai_model(model):
        # MONAI's UNETR and Swin UNETR end in `out`, a UnetOutBlock whose 1x1 conv gives one channel per class.
        convs = [m for m in getattr(model, "out", nn.Identity()).modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
        num_labels = convs[-1].out_channels if convs else None
    return {"num_labels": num_labels, **describe(model, block_class, blocks)}
