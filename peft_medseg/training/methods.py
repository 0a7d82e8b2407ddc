"""Adaptation methods: how a frozen base becomes a model to fine-tune for a new center, in one place.

| method        | trains                                                      | saved as                    |
|---------------|-------------------------------------------------------------|-----------------------------|
| `vpt-deep`    | prompts before every encoder block + the last classifier    | peft adapter (KBs)          |
| `vpt-shallow` | prompts before the first block + the last classifier        | peft adapter (KBs)          |
| `vpt-kv`      | key/value prompts in every attention layer (SegFormer, Swin) + the last classifier | peft adapter (KBs) |
| `vpt-deep-norms` | `vpt-deep` + the decode head's BatchNorm layers (per-center statistics) | peft adapter (KBs) |
| `vpt-deep-head` | `vpt-deep-norms` with 5 prompts per block + a per-center rank-2 1x1 update of every decode-head conv and, in 2D, a depthwise 3x3 filter of its output (not on pyramid-pooling branches) + a rank-1 update of each block's MLP output projection | peft adapter (KBs) |
| `vpt-deep-decoder` | `vpt-deep` + a per-center copy of the whole decode head (opt-in; head-sized) | peft adapter (head-sized) |
| `lora`        | LoRA on the encoder attention projections + the classifier  | peft adapter                |
| `decoder`     | the whole decode head (partial fine-tuning, as in the paper) | full model                  |
| `classifier`  | the last 1x1 classifier conv only (the paper's partial baseline) | full model              |
| `full`        | everything                                                  | full model                  |

The prompt and LoRA methods train the last classifier (`decode_head.classifier`) with the adapter by default: a
calibration on real data showed prompts alone recover only about a third of the gap to full fine-tuning, because much
of the adaptation that matters is in the head. Pass `train_classifier=False` for prompts only.

`vpt-deep-norms` also gives each center its own copy of the decode head's BatchNorm layers (affine weights and
running statistics, about 0.2% of a tiny model): the head's feature statistics are what a new scanner shifts most, and
re-estimating them closed most of the gap to full fine-tuning on both the embedded data and the real breast
ultrasound centers (README, "What we measured"). Mixed-center batches route these copies per sample too.

On a 3D base (MONAI's UNETR / Swin UNETR) the same methods apply to its parts: the classifier is the output conv
(`out.conv.conv`), the decode head is everything outside the transformer (`vit` / `swinViT`), the head norms are the
decoder's affine InstanceNorms, and LoRA targets the attention's `qkv` and output projections.

`vpt-deep-head` adds, in the same adapter, a low-rank (rank `HEAD_RANK`) 1x1 update of every decode-head convolution
(`VisualPromptConfig.head_rank`). On real center pairs much of what full fine-tuning changes sits in the head, more
than its norms can express (README, "What we measured"). On 2D bases each updated conv also gets a per-center
depthwise 3x3 filter of its output (`head_depthwise`): what the 1x1 update missed against decoder fine-tuning was
mostly the smallest lesions, and the filter, a per-channel spatial change, gained up to 1.7 validation Dice points
and lost none (within 0.1) on any split of either base (README, "Real shift"). UperNet's pyramid-pooling branches, which
act on 1x1 to 6x6 pooled maps, get none: that keeps `tiny`'s adapter under 2% (1.86%). Not on 3D bases: not measured
there, and each filter keeps one more full-size feature map for the backward pass (56 MB per conv at 96³).

`vpt-deep-head` also gives each center a rank-1 update of every prompted block's MLP output projection
(`VisualPromptConfig.mlp_rank`, `MLP_RANK`) and uses 5 prompts per block instead of 10, which keeps its size.
Prompts reach the image tokens only through attention; full fine-tuning moves the encoder's MLPs most, and the
trade validated higher on seven of the development benchmark's eight splits (README, "Real shift").

`vpt-deep-decoder` is the opt-in for when the last points matter more than the adapter's size: next to the prompts,
each center trains its own copy of the whole decode head (peft's `modules_to_save`), as decoder fine-tuning does, but
as one adapter that routes per sample and leaves the shared base untouched. Its size is the head's: small under a
large encoder (4.6% of the `tiny-encoder` base, 4.6% of the paper-sized `unetr-base`), large under UperNet's head on a
tiny encoder (68% of `tiny`).
"""

from __future__ import annotations

import types
from contextlib import AbstractContextManager, nullcontext

import torch
from peft.utils import ModulesToSaveWrapper
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

# Importing the package registers the visual prompt method with peft.
from ..models3d import is_volume_model
from ..visual_prompt import VisualPromptConfig, VisualPromptModel, keep_frozen_norms_in_eval

# The method of `finetune_center.py`, `make demo` and the model card unless one is chosen (README, "What we measured").
DEFAULT_METHOD = "vpt-deep-head"
METHODS = (
    "vpt-deep",
    "vpt-shallow",
    "vpt-deep-norms",
    "vpt-deep-head",
    "vpt-deep-decoder",
    "vpt-kv",
    "lora",
    "decoder",
    "classifier",
    "full",
)
PEFT_METHODS = ("vpt-deep", "vpt-shallow", "vpt-deep-norms", "vpt-deep-head", "vpt-deep-decoder", "vpt-kv", "lora")
VPT_METHODS = ("vpt-deep", "vpt-shallow", "vpt-deep-norms", "vpt-deep-head", "vpt-deep-decoder", "vpt-kv")
# Rank of `vpt-deep-head`'s update of the head convolutions (VisualPromptConfig.head_rank).
HEAD_RANK = 2
# Rank of `vpt-deep-head`'s update of each prompted block's MLP output projection (VisualPromptConfig.mlp_rank).
MLP_RANK = 1
# Prompts per block: 10 unless the method says otherwise. `vpt-deep-head` spends half of them on its MLP updates
# (5 prompts + rank-1 MLP updates: the size of 10 prompts, higher validation Dice on seven of eight splits; README,
# "Real shift"). `--num_virtual_tokens` overrides it.
NUM_VIRTUAL_TOKENS = 10
DEFAULT_NUM_VIRTUAL_TOKENS: dict[str, int] = {"vpt-deep-head": 5}

# Per-method AdamW learning rates. Prompts start from random tokens and move a tiny fraction of the network, so they
# need a learning rate two to three orders of magnitude above full fine-tuning (VPT paper: 0.01 to 1 with SGD); LoRA
# and the head sit in between. `--learning_rate` overrides these. `vpt-deep-head`'s rate was chosen on the validation
# splits of the development benchmark (README, "Real shift, every split"): 1e-2 had the best validation Dice on every
# screened split and base (3e-2 and 1e-1 lower), and is used for every split. `vpt-deep-decoder`'s rate likewise:
# 1e-2 had the best validation Dice on `tiny-encoder`/`busi` (3e-3 and 3e-2 lower) and on `tiny`/`busi` and
# `tiny`/`busbra_logiq7` (3e-2 lower; README, "Real shift").
DEFAULT_LEARNING_RATES: dict[str, float] = {
    "vpt-deep": 3e-2,
    "vpt-shallow": 3e-2,
    "vpt-deep-norms": 3e-2,
    "vpt-deep-head": 1e-2,
    "vpt-deep-decoder": 1e-2,
    "vpt-kv": 3e-2,
    "lora": 1e-3,
    "decoder": 1e-3,
    "classifier": 1e-2,
    "full": 1e-4,
}

# The last classifier of an UperNet head: a leaf Conv2d, so mixed-center batches can route it per sample.
CLASSIFIER_MODULE = "decode_head.classifier"
DECODER_MODULE = "decode_head"
# The attention projections of DINOv2 (`backbone.encoder.layer.N.attention.*`) and SegFormer
# (`segformer.stages.S.blocks.N.attention.*`) in transformers 5.
LORA_TARGET_MODULES = r".*\.attention\.(q_proj|k_proj|v_proj|o_proj)"
# 3D models (MONAI): the final 1x1x1 conv, the encoder whose complement is the decoder, the attention projections
# (UNETR's `vit.blocks.N.attn.qkv|out_proj`, Swin UNETR's `swinViT.layersS.0.blocks.N.attn.qkv|proj`).
VOLUME_CLASSIFIER_MODULE = "out.conv.conv"
VOLUME_ENCODERS = ("vit", "swinViT")
# The encoder blocks of MONAI's UNETR and Swin UNETR, each its own activation checkpoint.
VOLUME_ENCODER_BLOCKS = ("TransformerBlock", "SwinTransformerBlock")
VOLUME_LORA_TARGET_MODULES = r".*\.attn\.(qkv|out_proj|proj)"


def default_learning_rate(method: str) -> float:
    """The AdamW learning rate used for `method` unless one is given (see `DEFAULT_LEARNING_RATES`)."""
    _check_method(method)
    return DEFAULT_LEARNING_RATES[method]


def default_num_virtual_tokens(method: str) -> int:
    """The prompts per block used for `method` unless a number is given (see `DEFAULT_NUM_VIRTUAL_TOKENS`)."""
    _check_method(method)
    return DEFAULT_NUM_VIRTUAL_TOKENS.get(method, NUM_VIRTUAL_TOKENS)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}: expected one of {list(METHODS)}.")


def _train_only(model: nn.Module, prefixes: tuple[str, ...]) -> nn.Module:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(name == p or name.startswith(p + ".") for p in prefixes))
    return model


def prepare_model(
    base: nn.Module,
    method: str,
    num_virtual_tokens: int | None = None,
    prompt_dropout: float = 0.1,
    train_classifier: bool = True,
    lora_rank: int = 8,
    lora_alpha: int = 16,
) -> nn.Module:
    """Turn a base segmentation model into the model that `method` fine-tunes (see the module table).

    The prompt and LoRA methods return a `peft.PeftModel` around `base` (which is modified in place, as peft does);
    `decoder`, `classifier` and `full` return `base` itself with only the trained parameters requiring grad.
    Frozen norm layers must not update their running statistics: train with `set_train_mode`.
    `num_virtual_tokens=None` takes the method's default (`default_num_virtual_tokens`).
    """
    _check_method(method)
    if num_virtual_tokens is None:
        num_virtual_tokens = default_num_virtual_tokens(method)
    volume = is_volume_model(base)
    classifier = VOLUME_CLASSIFIER_MODULE if volume else CLASSIFIER_MODULE
    head = [classifier] if train_classifier else None
    if method in VPT_METHODS:
        from peft import get_peft_model

        if method in ("vpt-deep-norms", "vpt-deep-head"):
            head = (head or []) + head_norm_modules(base)
        elif method == "vpt-deep-decoder":  # the whole head, the classifier included
            head = decoder_modules(base)
        config = VisualPromptConfig(
            num_virtual_tokens=num_virtual_tokens,
            deep=method != "vpt-shallow",
            prompt_mode="key_value" if method == "vpt-kv" else "tokens",
            prompt_dropout=prompt_dropout,
            head_rank=HEAD_RANK if method == "vpt-deep-head" else 0,
            head_depthwise=method == "vpt-deep-head" and not volume,
            mlp_rank=MLP_RANK if method == "vpt-deep-head" else 0,
            modules_to_save=head,
        )
        return get_peft_model(base, config)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha,
            target_modules=VOLUME_LORA_TARGET_MODULES if volume else LORA_TARGET_MODULES,
            modules_to_save=head,
        )
        return get_peft_model(base, config)
    if method == "decoder":
        return _train_only(base, tuple(decoder_modules(base)))
    if method == "classifier":
        return _train_only(base, (classifier,))
    return base.requires_grad_(True)


def decoder_modules(model: nn.Module) -> list[str]:
    """The decode head: `decode_head` of an UperNet, or everything outside the transformer encoder of a 3D model
    (UNETR's and Swin UNETR's convolutional encoder-decoder branches and output conv)."""
    if not is_volume_model(model):
        return [DECODER_MODULE]
    return [name for name, _ in model.named_children() if name not in VOLUME_ENCODERS]


def uses_gradient_checkpointing(method: str, gradient_checkpointing: bool | None = None) -> bool:
    """Whether `method` trains with activation checkpointing: `gradient_checkpointing`, or by default the prompts.

    Prompts need the gradient to flow back through every encoder block, so without recomputation a prompt step
    keeps all the encoder's activations, like full fine-tuning. Recomputing them gives the same gradients (tested)
    and a much lower peak memory (README, "Speed and memory"), for about a third more step time.
    """
    _check_method(method)
    return method in VPT_METHODS if gradient_checkpointing is None else bool(gradient_checkpointing)


def enable_gradient_checkpointing(model: nn.Module) -> list[str]:
    """Turn on activation checkpointing of the encoder blocks (and, in 3D, of the decoder); returns what it enabled.

    2D: each model's own support (transformers' `PreTrainedModel.activation_checkpointing_enable`, non-reentrant) on
    the outermost submodels that support it, for example the backbone of an UperNet (the head itself does not) or a
    whole SegFormer. 3D: MONAI's UNETR has none, so `checkpoint_volume_modules` does it.
    """
    if is_volume_model(model):
        return checkpoint_volume_modules(model)
    # The recomputation of a mixed-center batch routes its samples as the forward pass did (the MLP updates inside
    # the blocks; the prompts reach the blocks as arguments, which the recomputation replays anyway).
    kwargs = {"use_reentrant": False, "context_fn": _checkpoint_context_fn(model)}
    enabled: list[str] = []
    for name, module in model.named_modules():
        if any(name == done or name.startswith(done + ".") or done == "" for done in enabled):
            continue
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            enabled.append(name)
    if not enabled:
        raise ValueError(f"{type(model).__name__} has no submodel that supports activation checkpointing.")
    return enabled


def checkpoint_volume_modules(model: nn.Module) -> list[str]:
    """Non-reentrant activation checkpointing of a 3D model (MONAI's UNETR or Swin UNETR); returns the modules' names.

    Checkpointed: every transformer block of the encoder on its own (a block whose forward the prompts override:
    its attention and MLP), and every top-level module of the decoder. At 96³ the decoder's full-resolution feature
    maps dominate a prompt step's memory; one checkpoint around the whole encoder would keep every block's
    activations during its recomputation. A mixed-center batch is recomputed with the routing of its forward pass
    (`VisualPromptModel.checkpoint_context_fn`), so gradients equal those without checkpointing (tested).
    """
    network = model.get_base_model() if hasattr(model, "get_base_model") else model
    context_fn = _checkpoint_context_fn(model)
    units: list[str] = []
    for child_name, child in network.named_children():
        if isinstance(child, ModulesToSaveWrapper):
            # A decoder block copied per center (`vpt-deep-decoder`): each copy is its own checkpoint, so a mixed
            # batch, which routes its samples through the copies, is checkpointed too.
            units += [f"{child_name}.original_module"] + [
                f"{child_name}.modules_to_save.{n}" for n in child.modules_to_save
            ]
            continue
        if child_name not in VOLUME_ENCODERS:
            units.append(child_name)
            continue
        for name, block in child.named_modules(prefix=child_name):
            if type(block).__name__ not in VOLUME_ENCODER_BLOCKS:
                continue
            if "forward" not in vars(block):
                units.append(name)
                continue
            # The prompts are inside the token sequence by the time the block's attention and MLP run.
            parts = [n for n, part in block.named_children() if n != "visual_prompt" and list(part.parameters())]
            units += [f"{name}.{part}" for part in parts]
    for name in units:
        module = network.get_submodule(name)
        if "forward" in vars(module):
            raise ValueError(f"{name}: its forward is already overridden; it cannot also be checkpointed.")
        module.checkpoint_context_fn = context_fn
        module.forward = types.MethodType(_checkpointed_forward, module)
    return units


def _checkpointed_forward(module: nn.Module, *args, **kwargs):
    forward = type(module).forward
    if not torch.is_grad_enabled():
        return forward(module, *args, **kwargs)
    return checkpoint(forward, module, *args, use_reentrant=False, context_fn=module.checkpoint_context_fn, **kwargs)


def _checkpoint_context_fn(model: nn.Module):
    """The `context_fn` of `model`'s checkpoints: its visual prompt tuner's replay of a mixed batch's routing."""
    tuner = next((m for m in model.modules() if isinstance(m, VisualPromptModel)), None)
    return tuner.checkpoint_context_fn if tuner is not None else _no_context


def _no_context() -> tuple[AbstractContextManager, AbstractContextManager]:
    return nullcontext(), nullcontext()


def head_norm_modules(model: nn.Module) -> list[str]:
    """Names of the norm layers of the decode head, trained and saved per center by `vpt-deep-norms`: the BatchNorms
    of an UperNet head (affine and running statistics), or the affine InstanceNorms of a 3D decoder (a per-center
    scale and shift of each decoder feature; the named 3D configs have them)."""
    if is_volume_model(model):
        prefixes = tuple(name + "." for name in decoder_modules(model))
        return [
            name
            for name, module in model.named_modules()
            if name.startswith(prefixes)
            and isinstance(module, nn.modules.instancenorm._InstanceNorm)
            and module.affine
        ]
    return [
        name
        for name, module in model.named_modules()
        if name.startswith(DECODER_MODULE + ".") and isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]


def set_train_mode(model: nn.Module, mode: bool = True) -> nn.Module:
    """`model.train(mode)`, but frozen BatchNorm layers stay in eval mode.

    A BatchNorm whose parameters are frozen still updates its running statistics in train mode; those buffers are
    not part of an adapter (nor meant to change in partial fine-tuning), so the shared base would drift and a reloaded
    adapter would give other outputs. The visual prompt tuner does this itself; LoRA and plain models need it here.
    """
    model.train(mode)
    return keep_frozen_norms_in_eval(model) if mode else model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; for a peft model (peft's own count), total counts the base once plus the
    adapter."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
