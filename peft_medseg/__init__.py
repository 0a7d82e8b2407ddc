"""peft_medseg: visual prompt tuning for multi-center medical image segmentation, as a PEFT method.

`import peft_medseg` registers the method with peft, so that `get_peft_model`, `PeftModel.from_pretrained`,
`save_pretrained` and the rest of peft's API work with `VisualPromptConfig`. Import it before loading an adapter:
peft resolves the adapter type from adapter_config.json through a mapping that exists only after the import.
"""

from .routing import CenterRouter, CenterSignature
from .visual_prompt import (
    BASE_ADAPTER_NAME,
    SUPPORTED_BLOCK_CLASSES,
    VisualPromptConfig,
    VisualPromptLayer,
    VisualPromptModel,
    check_base_compatible,
    register_visual_prompt,
)

__version__ = "0.1.0"
__all__ = [
    "BASE_ADAPTER_NAME",
    "CenterRouter",
    "CenterSignature",
    "SUPPORTED_BLOCK_CLASSES",
    "VisualPromptConfig",
    "VisualPromptLayer",
    "VisualPromptModel",
    "check_base_compatible",
    "register_visual_prompt",
]
