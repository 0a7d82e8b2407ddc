"""The model card (README.md) of a center adapter: metadata, rendering from `hub_cards/`, and a local metadata check."""

from __future__ import annotations

import importlib.resources
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import eval_results_to_model_index


# The templates live at the top of the repository, next to the recipes that use them.
def _card_template_path() -> Path:
    """The packaged template: `hub_cards/` is installed as `peft_medseg.hub_cards` (pyproject `package-dir`), so the
    card renders from a regular wheel install as from a checkout."""
    try:
        packaged = importlib.resources.files("peft_medseg.hub_cards") / "center_adapter.md"
        if packaged.is_file():
            return Path(str(packaged))
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[2] / "hub_cards" / "center_adapter.md"


CARD_TEMPLATE_PATH = _card_template_path()

REQUIRED_TAGS = ("medical-image-segmentation", "visual-prompt-tuning")
CARD_TAGS = [*REQUIRED_TAGS, "image-segmentation", "peft", "peft_medseg", "vpt"]
TASK_TYPE = "image-segmentation"
DEFAULT_LICENSE = "apache-2.0"

# `namespace/name` as the Hub spells repo ids; a named offline config ("tiny") or a local path is not one.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_repo_id_or_none(name: str | None) -> str | None:
    """`name` if it reads as a Hub repo id and is not a local folder, else `None` (the card then omits it)."""
    if not name or not _REPO_ID.match(name) or os.path.isdir(name):
        return None
    return name


def _eval_results(evaluation: dict[str, Any]) -> list[EvalResult]:
    dataset = evaluation.get("dataset") or "peft_medseg-centers"
    results = []
    for test_center, scores in sorted(evaluation["metrics"].items()):
        common = dict(
            task_type=TASK_TYPE,
            task_name="Medical image segmentation",
            dataset_type=dataset,
            dataset_name=f"Center {test_center} (test)",
            dataset_config=test_center,
            dataset_split="test",
        )
        results.append(
            EvalResult(metric_type="dice", metric_name="Dice", metric_value=round(scores["dice"], 4), **common)
        )
        if scores["hd95"] is not None:
            results.append(
                EvalResult(metric_type="hd95", metric_name="HD95", metric_value=round(scores["hd95"], 4), **common)
            )
    return results


def build_card_data(
    adapter_config: dict[str, Any],
    evaluation: dict[str, Any] | None = None,
    *,
    repo_id: str | None = None,
    license: str = DEFAULT_LICENSE,
    base_model: str | None = None,
) -> ModelCardData:
    """The YAML metadata of a center adapter's card.

    Args:
        adapter_config: The adapter's `adapter_config.json` as a dict.
        evaluation: A validated evaluation dict (see `peft_medseg.hub.evaluation_record`); gives `model-index` and `datasets`.
        repo_id: Name of the model in `model-index`; defaults to `peft_medseg-vpt-center-<center>`.
        license: SPDX-style license id of the adapter.
        base_model: Hub id of the base; defaults to the adapter's `base_model_name_or_path`. Left out of the
            metadata when it is not a Hub id (a named offline base or a local path), since the Hub links it.
    """
    evaluation = evaluation or {}
    center = evaluation.get("center")
    model_name = repo_id or f"peft_medseg-vpt-center-{center or 'unknown'}"
    tags = list(CARD_TAGS) + ([f"center-{center}"] if center else [])
    eval_results = _eval_results(evaluation) if evaluation.get("metrics") else None
    return ModelCardData(
        library_name="peft",
        base_model=hub_repo_id_or_none(base_model or adapter_config.get("base_model_name_or_path")),
        license=license,
        pipeline_tag=TASK_TYPE,
        tags=tags,
        datasets=[evaluation["dataset"]] if hub_repo_id_or_none(evaluation.get("dataset")) else None,
        metrics=["dice", "hd95"] if eval_results else None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
    )


def _human_bytes(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if num_bytes < 1024 or unit == "MiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} GiB"  # pragma: no cover - unreachable, keeps type checkers happy


def render_adapter_card(
    adapter_config: dict[str, Any],
    evaluation: dict[str, Any] | None = None,
    *,
    repo_id: str | None = None,
    license: str = DEFAULT_LICENSE,
    base_model: str | None = None,
    trainable_parameters: int | None = None,
    adapter_bytes: int | None = None,
    template_path: str | Path | None = None,
) -> ModelCard:
    """Render the README.md of a center adapter from the `hub_cards/center_adapter.md` template.

    Args:
        adapter_config: The adapter's `adapter_config.json` as a dict.
        evaluation: A validated evaluation dict, or `None` when the adapter has not been evaluated yet.
        repo_id: The repo the card is for; used in the loading example and as the `model-index` name.
        license: License id for the metadata.
        base_model: Overrides the base id recorded in the adapter config (for the metadata and example only).
        trainable_parameters: Number of parameters in the adapter file.
        adapter_bytes: Size of `adapter_model.safetensors` in bytes.
        template_path: Another Jinja template to render instead of the default one.

    Returns:
        A `huggingface_hub.ModelCard`; `str(card)` is the README.md text.
    """
    evaluation = evaluation or {}
    card_data = build_card_data(adapter_config, evaluation, repo_id=repo_id, license=license, base_model=base_model)
    base_id = base_model or adapter_config.get("base_model_name_or_path")
    total = evaluation.get("total_parameters")
    share = 100.0 * trainable_parameters / total if trainable_parameters and total else None
    metrics = sorted(evaluation.get("metrics", {}).items())
    center = evaluation.get("center")
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path or CARD_TEMPLATE_PATH),
        repo_id=repo_id or "<namespace>/<this-adapter>",
        center=center,
        method=evaluation.get("method") or ("vpt-deep" if adapter_config.get("deep", True) else "vpt-shallow"),
        base_id=base_id,
        base_is_hub_repo=hub_repo_id_or_none(base_id) is not None,
        base_revision=adapter_config.get("revision"),
        adapter=adapter_config,
        train=evaluation.get("train") or {},
        dataset=evaluation.get("dataset"),
        trainable_parameters=trainable_parameters,
        total_parameters=total,
        trainable_share=None if share is None else f"{share:.3g}",
        adapter_size=None if adapter_bytes is None else _human_bytes(adapter_bytes),
        metrics=metrics,
        mean_dice=(sum(s["dice"] for _, s in metrics) / len(metrics)) if metrics else None,
    )


def validate_card_metadata(card: ModelCard | str) -> ModelCardData:
    """Check a rendered card's metadata with huggingface_hub's own parser, offline.

    The text is parsed again exactly as `ModelCard.load` would (strict YAML, `model-index` through
    `model_index_to_eval_results`), and the parsed evaluation results must convert back to the same `model-index`.
    This is the client-side validation; the Hub's server-side schema check (`ModelCard.validate`) needs the Hub.

    Raises:
        ValueError: naming the problem, when the metadata does not parse or misses what a center adapter needs.
    """
    text = str(card)
    parsed = ModelCard(text, ignore_metadata_errors=False)
    data = parsed.data
    if data.library_name != "peft":
        raise ValueError(f"card metadata: library_name must be 'peft', got {data.library_name!r}.")
    missing = [tag for tag in REQUIRED_TAGS if tag not in (data.tags or [])]
    if missing:
        raise ValueError(f"card metadata: tags {missing} are missing from {data.tags}.")
    if not data.license:
        raise ValueError("card metadata: license is missing.")
    # The metadata as written, not as re-serialised by ModelCardData, for the round-trip comparison below.
    raw_index = (yaml.safe_load(text.split("---", 2)[1]) or {}).get("model-index")
    if data.eval_results:
        for result in data.eval_results:
            if not isinstance(result.metric_value, (int, float)) or not math.isfinite(result.metric_value):
                raise ValueError(
                    f"card metadata: {result.metric_type} of {result.dataset_name} is not a finite number."
                )
        if eval_results_to_model_index(data.model_name, data.eval_results) != raw_index:
            raise ValueError("card metadata: model-index does not survive a parse/serialise round trip.")
    return data
