"""What a saved visual prompt adapter must hold, for both prompt modes: the one place outside peft that knows the
adapter format. The Hub code (`push_adapter.py`, the dry run) and the loaders ask it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from .config import VisualPromptConfig
from .files import ADAPTER_CONFIG_NAME, PROMPT_KEY, check_adapter_weights_file, read_adapter_config
from .peft_type import PEFT_TYPE_NAME


@dataclass
class AdapterCheck:
    """What `check_adapter_folder` found: the config as saved, and facts about the weights for a model card."""

    adapter_dir: Path
    config: dict[str, Any]
    num_prompt_tensors: int
    trainable_parameters: int
    adapter_bytes: int


def expected_prompt_tensors(config: dict[str, Any]) -> int:
    """How many prompt tensors an adapter with this config holds: one per prompted block (deep, key/value) or one."""
    if config.get("prompt_mode", "tokens") == "tokens" and not config.get("deep", True):
        return 1
    return len(config["layers"]) if config.get("layers") else config["num_blocks"]


def check_adapter_folder(adapter_dir: str | Path) -> AdapterCheck:
    """Check that a folder is a loadable visual prompt adapter whose weights fit the base architecture it states.

    The config must load as a `VisualPromptConfig` and carry the fields resolved from the base (`hidden_size`,
    `num_blocks`). Token prompts are `(num_virtual_tokens, hidden_size)`; key/value prompts are
    `(num_virtual_tokens, width)` with each attention layer's own width (hierarchical encoders widen stage by stage),
    the widest being `hidden_size`. Checking against the base itself (fingerprint, base id) happens when it loads.

    Raises:
        FileNotFoundError: naming the missing folder or file.
        ValueError: naming the file, the field or tensor key, and the offending value.
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG_NAME
    config = read_adapter_config(adapter_dir)
    weights_path = check_adapter_weights_file(adapter_dir)
    if config.get("peft_type") != PEFT_TYPE_NAME:
        raise ValueError(
            f"{config_path}: field 'peft_type' must be {PEFT_TYPE_NAME!r}, got {config.get('peft_type')!r}."
        )
    VisualPromptConfig.from_pretrained(str(adapter_dir))  # every field's type and range, naming the file
    for name in ("hidden_size", "num_blocks"):
        if config.get(name) is None:
            raise ValueError(
                f"{config_path}: field '{name}' must be a positive integer resolved from the base model, got None. "
                "Save the adapter from a model made with get_peft_model."
            )
    bad_layers = [i for i in config.get("layers") or [] if not 0 <= i < config["num_blocks"]]
    if bad_layers:
        raise ValueError(
            f"{config_path}: field 'layers' has {bad_layers}, outside the base's {config['num_blocks']} blocks."
        )

    key_value = config.get("prompt_mode", "tokens") == "key_value"
    tokens, hidden = config["num_virtual_tokens"], config["hidden_size"]
    widths, num_parameters = [], 0
    with safe_open(str(weights_path), framework="pt") as weights:
        for key in weights.keys():
            shape = tuple(weights.get_slice(key).get_shape())
            num_parameters += _numel(shape)
            if PROMPT_KEY not in key:
                continue
            widths.append(shape[-1])
            fits = (
                len(shape) == 2
                and shape[0] == tokens
                and (1 <= shape[1] <= hidden if key_value else shape[1] == hidden)
            )
            if not fits:
                expected = f"({tokens}, width <= {hidden})" if key_value else f"({tokens}, {hidden})"
                raise ValueError(
                    f"{weights_path}: tensor '{key}' has shape {shape}, but {ADAPTER_CONFIG_NAME} states "
                    f"(num_virtual_tokens, {'width' if key_value else 'hidden_size'}) = {expected}."
                )
    expected_count = expected_prompt_tensors(config)
    if len(widths) != expected_count:
        raise ValueError(
            f"{weights_path}: holds {len(widths)} prompt tensor(s) ('{PROMPT_KEY}' keys), but {ADAPTER_CONFIG_NAME} "
            f"(prompt_mode={config.get('prompt_mode', 'tokens')}, deep={config.get('deep')}, "
            f"layers={config.get('layers')}, num_blocks={config['num_blocks']}) needs {expected_count}."
        )
    if key_value and max(widths) != hidden:
        raise ValueError(
            f"{weights_path}: the widest key/value prompt is {max(widths)}, but {ADAPTER_CONFIG_NAME} states "
            f"hidden_size (the widest attention) = {hidden}."
        )
    return AdapterCheck(adapter_dir, config, len(widths), num_parameters, weights_path.stat().st_size)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
