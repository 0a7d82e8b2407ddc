"""Sharing center adapters on the Hugging Face Hub: evaluation JSON, model card, validation, dry run and push.

Pulling needs nothing from here: after `import peft_medseg`, `PeftModel.from_pretrained(base, "org/center-B")` works
from the Hub and from the offline cache.
"""

from ..storage import EVALUATION_FILENAME
from .card import CARD_TEMPLATE_PATH, build_card_data, render_adapter_card, validate_card_metadata
from .evaluation_record import read_evaluation, validate_evaluation
from .push import prepare_upload_folder, push_adapter_to_hub

__all__ = [
    "CARD_TEMPLATE_PATH",
    "EVALUATION_FILENAME",
    "build_card_data",
    "prepare_upload_folder",
    "push_adapter_to_hub",
    "read_evaluation",
    "render_adapter_card",
    "validate_card_metadata",
    "validate_evaluation",
]
