"""Writing models and checkpoints atomically, and loading a fine-tuned model back whatever its method."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

ADAPTER_CONFIG_NAME = "adapter_config.json"
EVALUATION_FILENAME = "evaluation.json"


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success it replaces `target` in one rename.

    A loader looking at `target` sees the old complete folder or the new complete one, never a half-written one; on
    an exception (or a kill) only a hidden `.<name>.tmp-*` folder is left behind, which no loader looks at.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            # A directory cannot be renamed over a non-empty one: move the old one aside first, then drop it.
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, trash / target.name)
            os.rename(staging, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def is_adapter_folder(path: str | Path) -> bool:
    """Whether `path` holds a peft adapter (adapter_config.json) rather than a full model."""
    return (Path(path) / ADAPTER_CONFIG_NAME).is_file()


def save_finetuned(
    model: nn.Module, output_dir: str | Path, image_processor=None, evaluation: dict[str, Any] | None = None
) -> Path:
    """Save a fine-tuned model atomically: the adapter for a peft model, else the full model (`save_pretrained`).

    The image processor (full models only: an adapter uses its base's) and the evaluation JSON go in the same folder.
    """
    from peft import PeftModel

    with atomic_directory(output_dir) as staging:
        model.save_pretrained(staging)
        if image_processor is not None and not isinstance(model, PeftModel):
            image_processor.save_pretrained(staging)
        if evaluation is not None:
            (staging / EVALUATION_FILENAME).write_text(json.dumps(evaluation, indent=2, allow_nan=True) + "\n")
    return Path(output_dir)


def load_base(path: str | Path):
    """A saved base segmentation model and its image processor, in eval mode."""
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    model = AutoModelForSemanticSegmentation.from_pretrained(path)
    return model.eval(), AutoImageProcessor.from_pretrained(path)


def load_finetuned(path: str | Path, base_model: str | Path) -> nn.Module:
    """A fine-tuned model in eval mode: `PeftModel.from_pretrained(base, path)` for an adapter, else the full model."""
    import peft_medseg  # noqa: F401  (registers the visual prompt type before peft reads adapter_config.json)

    if is_adapter_folder(path):
        from peft import PeftModel

        base, _ = load_base(base_model)
        return PeftModel.from_pretrained(base, str(path)).eval()
    model, _ = load_base(path)
    return model
