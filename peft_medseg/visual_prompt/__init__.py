from .architectures import SUPPORTED_BLOCK_CLASSES, SUPPORTED_KEY_VALUE_BLOCK_CLASSES
from .config import VisualPromptConfig
from .kv_layer import KeyValuePromptLayer
from .layer import BASE_ADAPTER_NAME, VisualPromptLayer
from .model import VisualPromptModel, check_base_compatible

__all__ = [
    "BASE_ADAPTER_NAME",
    "SUPPORTED_BLOCK_CLASSES",
    "SUPPORTED_KEY_VALUE_BLOCK_CLASSES",
    "KeyValuePromptLayer",
    "VisualPromptConfig",
    "VisualPromptLayer",
    "VisualPromptModel",
    "check_base_compatible",
]
