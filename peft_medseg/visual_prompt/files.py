"""The files of a visual prompt adapter folder: names, reading the config, and a first check of the weights file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peft.utils.constants import CONFIG_NAME as ADAPTER_CONFIG_NAME
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME
from peft.utils.constants import WEIGHTS_NAME as PICKLE_WEIGHTS_NAME
from safetensors import safe_open

# Saved prompt tensors have this in their key: one (num_virtual_tokens, width) tensor per prompted block/attention.
PROMPT_KEY = "visual_prompt.vpt_prompt"


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """A local adapter folder's adapter_config.json as a dict, with errors naming the file."""
    path = Path(folder) / ADAPTER_CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path}: missing; not an adapter folder (written by save_pretrained).") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error}).") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(config).__name__}.")
    return config


def check_adapter_weights_file(folder: str | Path) -> Path:
    """The safetensors weights file of a local adapter folder; a clear error naming it when missing or unreadable.

    A pickle-based `adapter_model.bin` is refused, not loaded: unpickling can run code.
    """
    folder = Path(folder)
    weights = folder / ADAPTER_WEIGHTS_NAME
    if not weights.is_file():
        if (folder / PICKLE_WEIGHTS_NAME).is_file():
            raise ValueError(
                f"{folder / PICKLE_WEIGHTS_NAME}: a pickle-based adapter; peft_medseg loads safetensors only. Save it "
                "again with save_pretrained (safe_serialization=True, the default)."
            )
        raise FileNotFoundError(
            f"{weights}: missing. An adapter folder needs {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME} "
            "(written by save_pretrained)."
        )
    try:
        with safe_open(weights, framework="pt") as handle:
            for key in handle.keys():
                handle.get_slice(key)
    except Exception as error:  # safetensors raises its own error type; name the file in ours
        raise ValueError(f"{weights}: not a readable safetensors file ({error}). Save the adapter again.") from error
    return weights
