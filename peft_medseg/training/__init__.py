"""Training for multi-center segmentation: methods (VPT, LoRA, partial, full), loss, data setup and the loop."""

from ..data import SYNTHETIC, load_multicenter_dataset, parse_label_map  # re-exported: the recipes' data entry
from ..storage import atomic_directory, is_adapter_folder, load_base, load_finetuned, save_finetuned
from .checkpoint import trainable_state
from .data import eval_transform, split_validation, train_transform
from .finetune import FinetuneOutcome, center_signature, finetune_center, pretrain_base
from .loop import (
    TrainingConfig,
    TrainingResult,
    latest_checkpoint,
    make_accelerator,
    train_segmentation,
)
from .loss import segmentation_loss
from .methods import (
    CLASSIFIER_MODULE,
    DEFAULT_LEARNING_RATES,
    DEFAULT_METHOD,
    LORA_TARGET_MODULES,
    METHODS,
    PEFT_METHODS,
    VPT_METHODS,
    checkpoint_volume_modules,
    count_parameters,
    decoder_modules,
    default_learning_rate,
    default_num_virtual_tokens,
    enable_gradient_checkpointing,
    head_norm_modules,
    prepare_model,
    set_train_mode,
    uses_gradient_checkpointing,
)

__all__ = [
    "CLASSIFIER_MODULE",
    "FinetuneOutcome",
    "center_signature",
    "DEFAULT_LEARNING_RATES",
    "DEFAULT_METHOD",
    "LORA_TARGET_MODULES",
    "METHODS",
    "PEFT_METHODS",
    "VPT_METHODS",
    "SYNTHETIC",
    "TrainingConfig",
    "TrainingResult",
    "atomic_directory",
    "checkpoint_volume_modules",
    "count_parameters",
    "decoder_modules",
    "default_learning_rate",
    "default_num_virtual_tokens",
    "enable_gradient_checkpointing",
    "eval_transform",
    "finetune_center",
    "head_norm_modules",
    "is_adapter_folder",
    "latest_checkpoint",
    "load_base",
    "load_finetuned",
    "load_multicenter_dataset",
    "make_accelerator",
    "parse_label_map",
    "prepare_model",
    "pretrain_base",
    "save_finetuned",
    "segmentation_loss",
    "set_train_mode",
    "split_validation",
    "train_segmentation",
    "train_transform",
    "trainable_state",
    "uses_gradient_checkpointing",
]
