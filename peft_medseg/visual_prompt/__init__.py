"""Visual prompt tuning as a peft method: importing this package registers it (as peft's own tuners do)."""

import warnings

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .adapter_folder import AdapterCheck, check_adapter_folder
from .architectures import SUPPORTED_BLOCK_CLASSES, SUPPORTED_KEY_VALUE_BLOCK_CLASSES
from .config import VisualPromptConfig
from .files import check_adapter_weights_file, read_adapter_config
from .kv_layer import DeepKeyValuePromptLayer, KeyValuePromptLayer
from .layer import BASE_ADAPTER_NAME, VisualPromptLayer
from .model import VisualPromptModel, check_base_compatible, keep_frozen_norms_in_eval
from .peft_type import PEFT_TYPE_NAME, PREFIX, VISUAL_PROMPT


def register_visual_prompt() -> None:
    """Register `VisualPromptConfig`/`VisualPromptModel` with peft. Safe to call more than once."""
    if VISUAL_PROMPT in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    register_peft_method(
        name=PEFT_TYPE_NAME.lower(), config_cls=VisualPromptConfig, model_cls=VisualPromptModel, prefix=PREFIX
    )


register_visual_prompt()

# peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` alias whenever it wraps a model (PeftModel's
# constructor), so every get_peft_model / PeftModel.from_pretrained on a transformers 5 model printed a FutureWarning
# that no caller can act on. Only that message is silenced; any other deprecation still shows.
warnings.filterwarnings(
    "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning, module="transformers"
)

__all__ = [
    "BASE_ADAPTER_NAME",
    "PEFT_TYPE_NAME",
    "SUPPORTED_BLOCK_CLASSES",
    "SUPPORTED_KEY_VALUE_BLOCK_CLASSES",
    "AdapterCheck",
    "DeepKeyValuePromptLayer",
    "KeyValuePromptLayer",
    "VisualPromptConfig",
    "VisualPromptLayer",
    "VisualPromptModel",
    "check_adapter_folder",
    "check_adapter_weights_file",
    "check_base_compatible",
    "keep_frozen_norms_in_eval",
    "read_adapter_config",
    "register_visual_prompt",
]
