"""Configuration of visual prompt tuning (VPT) as a PEFT method."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from peft.config import PeftConfig

from .files import ADAPTER_CONFIG_NAME, check_adapter_weights_file, read_adapter_config
from .peft_type import VISUAL_PROMPT

# Limits checked before anything is allocated: far above any published VPT setting (at most a few hundred prompts),
# far below what would exhaust memory by accident (an adapter file's config is data, not code).
MAX_VIRTUAL_TOKENS = 1024
MAX_RESOLVED_SIZE = 1 << 16


@dataclass
class VisualPromptConfig(PeftConfig):
    """
    Configuration of visual prompt tuning (Jia et al. 2022; Saeed et al. 2023 for multi-center segmentation).

    Learnable prompt tokens are inserted into the token sequence of the vision transformer's blocks, right after the
    CLS/register tokens, while every weight of the model stays frozen. The prompts never leave a block: its recorded
    hidden states (used by backbones and necks to build feature maps) contain the patch tokens only.

    Hierarchical encoders (SegFormer, Swin) reshape tokens to feature maps inside their blocks, so prompts cannot
    join their token sequence. `prompt_mode="key_value"` puts deep VPT inside attention instead: each attention
    layer's prompts are normalised and projected by that layer's own norm and key/value projections and appended to
    its keys and values. Patch tokens attend to them exactly as they attend to token-level deep prompts, whose own
    outputs VPT throws away, so on a plain ViT the two modes give the same patch outputs.

    Args:
        num_virtual_tokens (`int`):
            Number of prompt tokens per prompted block (deep) or in total (shallow).
        prompt_mode (`"tokens"` or `"key_value"`):
            `"tokens"`: prompts join the token sequence of the blocks (plain ViTs: DINOv2, DINOv3, BEiT, DPT, and the
            ViT of MONAI's UNETR, 2D or 3D).
            `"key_value"`: prompts join the keys and values of every prompted attention layer (SegFormer, Swin, and
            DINOv2 where it equals token-level deep VPT). SegFormer: the prompts join the spatially reduced key/value
            sequence, normalised by the LayerNorm that feeds the key/value projections (the reduction's LayerNorm;
            the block's LayerNorm in stages without reduction), one set per block at that stage's width. Swin (and
            MONAI's Swin UNETR, whose windows are window_size³ voxels in 3D): one set per block, shared by every
            window, with no relative position bias and never masked by the shifted windows. Key/value prompts are deep only (`deep=True`): they produce no outputs to carry.
        deep (`bool`):
            Deep VPT (`True`): fresh prompts are inserted before every chosen block and their outputs are dropped
            after it. Shallow VPT (`False`): prompts are inserted once, before the first chosen block, and carried
            through all later blocks.
        layers (`list[int]`, *optional*):
            Indices of the blocks that receive prompts, counted among the blocks of the targeted class in model order.
            `None` means every block (deep) or the first block (shallow). Shallow VPT takes a single index.
        prompt_init (`"vpt"` or `"normal"`):
            `"vpt"`: uniform in ±sqrt(6 / (3·p² + D)) with p the patch size and D the hidden size (the VPT paper's
            Xavier-style rule). `"normal"`: normal with std 0.02, like a ViT's CLS token.
        prompt_dropout (`float`):
            Dropout on the prompt tokens when they are inserted (0.1 in the VPT paper for deep prompts).
        target_modules (`str` or `list[str]`, *optional*):
            Class names of the transformer blocks to prompt, for example `"Dinov2Layer"`. `None` detects the block
            class among the supported architectures. Blocks are matched by class, not by module path.
        head_rank (`int`):
            Rank of a per-center low-rank 1x1 update of every convolution of the decode head (`conv(x) + up(down(x))`,
            `up` starting at zero), trained and saved with the prompts and routed per sample like them. 0: none.
            Prompts adapt the encoder; on real center pairs much of what full fine-tuning changes sits in the head.
        head_depthwise (`bool`):
            With `head_rank > 0`, also give each center a depthwise 3x3 (3x3x3 in 3D) filter on the output of every
            updated head convolution, `y + depthwise(y)`, starting at zero: a per-channel spatial change, which the
            1x1 update cannot make. On `breast_us` what the default misses against decoder fine-tuning is mostly the
            smallest lesions, which fine-tuning gets by re-learning the head's 3x3 kernels (README, "Real shift").
            Convs that act on an adaptively pooled map (UperNet's pyramid-pooling branches) get no filter.
        head_modules (`list[str]`, *optional*):
            Regular expressions (full match) of the `Conv2d`/`Conv3d` modules that get the head update. `None`: every
            conv of the decode head except those in `modules_to_save` (such as the classifier, trained whole): under
            `decode_head` in transformers' models, outside the transformer (`vit`, `swinViT`) in MONAI's UNETR and
            Swin UNETR.
        mlp_rank (`int`):
            Rank of a per-center low-rank update of the MLP output projection of every prompted block
            (`fc2(x; W + up·down)`, `up` starting at zero), trained and saved with the prompts and routed per sample
            like them. 0: none. Prompts change what a block's attention reads, not what its MLP computes; full
            fine-tuning moves the encoder's MLPs most (README, "Real shift").
        modules_to_save (`list[str]`, *optional*):
            Modules trained and saved with the prompts, for example `["decode_head.classifier"]` (the last classifier
            of an UperNet head). Name a leaf `Conv2d`/`Linear` so that mixed-center batches can route it per sample.
        num_labels, block_class, hidden_size, num_blocks, num_prefix_tokens, patch_size, base_model_type,
        base_fingerprint:
            Resolved from the base model when the adapter is created and saved with it, so that an adapter file
            describes itself and refuses a base it was not made for. Leave them `None`. With key/value prompts,
            `hidden_size` is the widest attention layer and `num_prefix_tokens` is 0.
    """

    num_virtual_tokens: int = field(default=10, metadata={"help": "Number of prompt tokens per prompted block."})
    prompt_mode: Literal["tokens", "key_value"] = field(
        default="tokens",
        metadata={"help": "'tokens': prompts join the token sequence; 'key_value': they join attention keys/values."},
    )
    deep: bool = field(default=True, metadata={"help": "Deep (per-block prompts) or shallow (first block) VPT."})
    layers: list[int] | None = field(
        default=None, metadata={"help": "Indices of the prompted blocks; None: all (deep) or the first (shallow)."}
    )
    prompt_init: Literal["vpt", "normal"] = field(
        default="vpt", metadata={"help": "'vpt': uniform ±sqrt(6/(3p²+D)); 'normal': N(0, 0.02²)."}
    )
    prompt_dropout: float = field(default=0.1, metadata={"help": "Dropout on the inserted prompt tokens."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Class name(s) of the blocks to prompt; None detects them."}
    )
    head_rank: int = field(
        default=0, metadata={"help": "Rank of the per-center low-rank 1x1 update of the decode head's convolutions."}
    )
    head_depthwise: bool = field(
        default=False, metadata={"help": "Per-center depthwise 3x3 filter on each updated head conv's output."}
    )
    head_modules: list[str] | None = field(
        default=None, metadata={"help": "Regexes of the head conv modules to update; None: every decode-head conv."}
    )
    mlp_rank: int = field(
        default=0, metadata={"help": "Rank of the per-center low-rank update of each prompted block's MLP output."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained and saved with the prompts, e.g. ['decode_head.classifier']."}
    )
    # Resolved from the base model at creation; saved so that the adapter describes the base it needs.
    num_labels: int | None = field(default=None, metadata={"help": "Resolved: number of classes of the base."})
    block_class: str | None = field(default=None, metadata={"help": "Resolved: class name of the prompted blocks."})
    hidden_size: int | None = field(default=None, metadata={"help": "Resolved: width of the prompted blocks."})
    num_blocks: int | None = field(default=None, metadata={"help": "Resolved: number of blocks of that class."})
    num_prefix_tokens: int | None = field(
        default=None, metadata={"help": "Resolved: CLS and register tokens before the patch tokens."}
    )
    patch_size: int | None = field(default=None, metadata={"help": "Resolved: patch size of the encoder."})
    base_model_type: str | None = field(default=None, metadata={"help": "Resolved: model_type of the base."})
    base_fingerprint: str | None = field(
        default=None, metadata={"help": "Resolved: hash of the base architecture (type and prompted block shapes)."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = VISUAL_PROMPT
        if isinstance(self.num_virtual_tokens, bool) or not isinstance(self.num_virtual_tokens, int):
            raise ValueError(f"num_virtual_tokens must be a positive int, got {self.num_virtual_tokens!r}.")
        if not 1 <= self.num_virtual_tokens <= MAX_VIRTUAL_TOKENS:
            raise ValueError(
                f"num_virtual_tokens must be an int in 1..{MAX_VIRTUAL_TOKENS}, got {self.num_virtual_tokens}."
            )
        for name in ("num_labels", "hidden_size", "num_blocks", "patch_size", "num_prefix_tokens"):
            value = getattr(self, name)
            lowest = 0 if name == "num_prefix_tokens" else 1
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not lowest <= value <= MAX_RESOLVED_SIZE
            ):
                raise ValueError(f"{name} must be None or an int in {lowest}..{MAX_RESOLVED_SIZE}, got {value!r}.")
        if isinstance(self.head_rank, bool) or not isinstance(self.head_rank, int) or not 0 <= self.head_rank <= 1024:
            raise ValueError(f"head_rank must be an int in 0..1024, got {self.head_rank!r}.")
        if isinstance(self.mlp_rank, bool) or not isinstance(self.mlp_rank, int) or not 0 <= self.mlp_rank <= 1024:
            raise ValueError(f"mlp_rank must be an int in 0..1024, got {self.mlp_rank!r}.")
        if not isinstance(self.head_depthwise, bool):
            raise ValueError(f"head_depthwise must be a bool, got {self.head_depthwise!r}.")
        if self.head_depthwise and not self.head_rank:
            raise ValueError("head_depthwise=True filters the outputs of the head update: it needs head_rank >= 1.")
        if isinstance(self.head_modules, str):
            self.head_modules = [self.head_modules]
        if self.head_modules is not None:
            for pattern in self.head_modules:
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as error:
                    raise ValueError(f"head_modules: {pattern!r} is not a regular expression ({error}).") from None
        if self.prompt_mode not in ("tokens", "key_value"):
            raise ValueError(f"prompt_mode must be 'tokens' or 'key_value', got {self.prompt_mode!r}.")
        if self.prompt_mode == "key_value" and not self.deep:
            raise ValueError(
                "prompt_mode='key_value' is deep VPT only (deep=True): key/value prompts have no outputs to carry to "
                "the next block, which shallow VPT needs."
            )
        if self.prompt_init not in ("vpt", "normal"):
            raise ValueError(f"prompt_init must be 'vpt' or 'normal', got {self.prompt_init!r}.")
        if isinstance(self.prompt_dropout, bool) or not isinstance(self.prompt_dropout, (int, float)):
            raise ValueError(f"prompt_dropout must be a number in [0, 1), got {self.prompt_dropout!r}.")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}.")
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < MAX_RESOLVED_SIZE for i in self.layers
            ):
                raise ValueError(f"layers must be None or a list of block indices (ints >= 0), got {self.layers!r}.")
            self.layers = sorted(set(self.layers))
            if not self.layers:
                raise ValueError("layers must name at least one block index, or be None for the default.")
            if not self.deep and len(self.layers) != 1:
                raise ValueError(
                    f"Shallow VPT inserts prompts once, so layers takes a single block index, got {self.layers}."
                )
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load the config; for a local adapter folder, check its files first, before anything is modified.

        A config file that is not valid JSON, names an unknown field, or holds a value out of range raises a
        `ValueError` naming the file.
        """
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        config_file = folder / ADAPTER_CONFIG_NAME
        if folder.is_dir():
            read_adapter_config(folder)
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except (TypeError, ValueError) as error:
            where = config_file if folder.is_dir() else pretrained_model_name_or_path
            raise ValueError(f"{where}: not a valid visual prompt adapter config ({error}).") from error
        if folder.is_dir():
            check_adapter_weights_file(folder)
        return config
