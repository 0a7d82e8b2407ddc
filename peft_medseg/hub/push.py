"""Checking a center adapter folder, staging exactly what gets uploaded, and pushing it with `huggingface_hub`."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
from safetensors import safe_open

from ..storage import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, atomic_directory
from .card import DEFAULT_LICENSE, render_adapter_card, validate_card_metadata
from .evaluation import EVALUATION_FILENAME, read_evaluation

CARD_NAME = "README.md"
PEFT_TYPE = "VISUAL_PROMPT"
# Saved prompt tensors have this in their key: one (num_virtual_tokens, hidden_size) tensor per prompted block.
PROMPT_KEY = "visual_prompt.vpt_prompt"


@dataclass
class AdapterCheck:
    """What `validate_adapter_folder` found: the config as saved, and facts about the weights for the card."""

    adapter_dir: Path
    config: dict[str, Any]
    num_prompt_tensors: int
    trainable_parameters: int
    adapter_bytes: int


def _expected_prompted_blocks(config: dict[str, Any]) -> int:
    # Mirrors VisualPromptConfig: `layers` names the prompted blocks; None means all of them (deep) or the first.
    if config.get("layers"):
        return len(config["layers"])
    return config["num_blocks"] if config.get("deep", True) else 1


def validate_adapter_folder(adapter_dir: str | Path) -> AdapterCheck:
    """Check that a folder is a loadable visual prompt adapter whose weights fit the base architecture it states.

    The config must load as a `peft_medseg.VisualPromptConfig` and carry the fields resolved from the base
    (`hidden_size`, `num_blocks`); the weights must hold one `(num_virtual_tokens, hidden_size)` prompt per prompted
    block. Checking against the base model itself (weights fingerprint, base id) happens when the adapter is loaded.

    Raises:
        FileNotFoundError: naming the missing folder or file.
        ValueError: naming the file, the field or tensor key, and the offending value.
    """
    import peft_medseg  # registers the VISUAL_PROMPT type with peft; imported here so card/evaluation need no torch

    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG_NAME, adapter_dir / ADAPTER_WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found. Is {adapter_dir} an adapter saved with save_pretrained?")

    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: not valid JSON ({error}).") from error
    if not isinstance(config, dict) or config.get("peft_type") != PEFT_TYPE:
        found = config.get("peft_type") if isinstance(config, dict) else config
        raise ValueError(f"{config_path}: field 'peft_type' must be {PEFT_TYPE!r}, got {found!r}.")
    try:
        peft_medseg.VisualPromptConfig.from_pretrained(str(adapter_dir))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_path}: does not load as a VisualPromptConfig: {error}") from error
    for name in ("hidden_size", "num_blocks", "num_virtual_tokens"):
        value = config.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"{config_path}: field '{name}' must be a positive integer resolved from the base model, got"
                f" {value!r}. Save the adapter from a model made with get_peft_model."
            )
    bad_layers = [i for i in config.get("layers") or [] if not 0 <= i < config["num_blocks"]]
    if bad_layers:
        raise ValueError(
            f"{config_path}: field 'layers' has {bad_layers}, outside the base's {config['num_blocks']} blocks."
        )

    expected_shape = (config["num_virtual_tokens"], config["hidden_size"])
    num_prompts, num_parameters = 0, 0
    with safe_open(str(weights_path), framework="pt") as weights:
        for key in weights.keys():
            shape = tuple(weights.get_slice(key).get_shape())
            num_parameters += _numel(shape)
            if PROMPT_KEY in key:
                num_prompts += 1
                if shape != expected_shape:
                    raise ValueError(
                        f"{weights_path}: tensor '{key}' has shape {shape}, but {ADAPTER_CONFIG_NAME} states"
                        f" (num_virtual_tokens, hidden_size) = {expected_shape}."
                    )
    expected_prompts = _expected_prompted_blocks(config)
    if num_prompts != expected_prompts:
        raise ValueError(
            f"{weights_path}: holds {num_prompts} prompt tensor(s) ('{PROMPT_KEY}' keys), but {ADAPTER_CONFIG_NAME}"
            f" (deep={config.get('deep')}, layers={config.get('layers')}, num_blocks={config['num_blocks']}) needs"
            f" {expected_prompts}."
        )
    return AdapterCheck(
        adapter_dir=adapter_dir,
        config=config,
        num_prompt_tensors=num_prompts,
        trainable_parameters=num_parameters,
        adapter_bytes=weights_path.stat().st_size,
    )


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def prepare_upload_folder(
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    repo_id: str | None = None,
    evaluation_path: str | Path | None = None,
    license: str = DEFAULT_LICENSE,
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write exactly the files a push uploads: adapter config, weights, README.md and, if given, evaluation.json.

    The folder is written next to `output_dir` under a temporary name and renamed into place only once complete, so a
    loader never sees a half-written adapter. This is what `push_adapter.py --dry-run` produces.

    Args:
        adapter_dir: Folder saved by `PeftModel.save_pretrained`.
        output_dir: Where to write the upload folder. Must not exist unless `overwrite=True`.
        repo_id: The target repo, named in the card.
        evaluation_path: The recipe's evaluation JSON; uploaded as `evaluation.json` and summarised in the card.
        license: License id for the card metadata.
        base_model: Hub id of the base for the card, when the config records a local path instead.
        overwrite: Replace an existing `output_dir`.

    Returns:
        `output_dir` as a `Path`.

    Raises:
        FileExistsError: if `output_dir` exists and `overwrite` is False.
        ValueError / FileNotFoundError: from the adapter, evaluation and card checks, naming file and field.
    """
    check = validate_adapter_folder(adapter_dir)
    evaluation = read_evaluation(evaluation_path) if evaluation_path is not None else None
    if evaluation is not None:
        _check_same_base(check, evaluation, evaluation_path)
    card = render_adapter_card(
        check.config,
        evaluation,
        repo_id=repo_id,
        license=license,
        base_model=base_model,
        trainable_parameters=check.trainable_parameters,
        adapter_bytes=check.adapter_bytes,
    )
    validate_card_metadata(card)

    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir}: already exists. Remove it, or pass overwrite=True (--overwrite).")
    with atomic_directory(output_dir) as staging:
        shutil.copyfile(check.adapter_dir / ADAPTER_CONFIG_NAME, staging / ADAPTER_CONFIG_NAME)
        shutil.copyfile(check.adapter_dir / ADAPTER_WEIGHTS_NAME, staging / ADAPTER_WEIGHTS_NAME)
        (staging / CARD_NAME).write_text(str(card), encoding="utf-8")
        if evaluation_path is not None:
            # The file as the recipe wrote it, byte for byte: the card is the summary, this is the record.
            shutil.copyfile(evaluation_path, staging / EVALUATION_FILENAME)
    return output_dir


def _check_same_base(check: AdapterCheck, evaluation: dict[str, Any], evaluation_path: str | Path) -> None:
    # A card that pairs one base's adapter with another base's scores would mislead the next center.
    recorded, evaluated = check.config.get("base_model_name_or_path"), evaluation.get("base_model")
    if recorded and evaluated and recorded != evaluated:
        raise ValueError(
            f"{evaluation_path}: field 'base_model' is {evaluated!r}, but"
            f" {check.adapter_dir / ADAPTER_CONFIG_NAME} records base_model_name_or_path {recorded!r}."
        )


def push_adapter_to_hub(
    adapter_dir: str | Path,
    repo_id: str,
    *,
    evaluation_path: str | Path | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    license: str = DEFAULT_LICENSE,
    base_model: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> CommitInfo:
    """Validate a center adapter, render its card and push it to the Hub in one commit.

    The uploaded files are exactly those `prepare_upload_folder` writes (the `--dry-run` output).

    Args:
        adapter_dir: Folder saved by `PeftModel.save_pretrained`.
        repo_id: Target model repo, `namespace/name`. Created if missing.
        evaluation_path: The recipe's evaluation JSON, uploaded as `evaluation.json` and summarised in the card.
        private: Create the repo private. Refuses to upload if the repo already exists and is public.
        revision: Branch to commit to; created from `main` when missing.
        create_pr: Open a pull request against `main` instead of committing to it.
        commit_message: Defaults to "Upload visual prompt adapter for center <center>".
        license: License id for the card metadata.
        base_model: Hub id of the base for the card, when the config records a local path instead.
        token: Hub token; defaults to the logged-in one (`HF_TOKEN`, `hf auth login`).
        endpoint: Hub URL; defaults to `HF_ENDPOINT` or https://huggingface.co.

    Returns:
        The `huggingface_hub.CommitInfo` of the commit; `pr_url` is set when `create_pr=True`.
    """
    if create_pr and revision not in (None, "main"):
        raise ValueError(
            f"create_pr opens a pull request against main; it cannot be combined with revision={revision!r}."
        )
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="peft_medseg-push-") as tmp:
        folder = prepare_upload_folder(
            adapter_dir,
            Path(tmp) / "upload",
            repo_id=repo_id,
            evaluation_path=evaluation_path,
            license=license,
            base_model=base_model,
        )
        api.create_repo(repo_id, private=private, exist_ok=True)
        if private and not api.model_info(repo_id).private:
            raise ValueError(
                f"{repo_id} already exists and is public, but private=True (--private) was asked: not uploading."
            )
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        if commit_message is None:
            center = read_evaluation(evaluation_path)["center"] if evaluation_path is not None else None
            commit_message = "Upload visual prompt adapter" + (f" for center {center}" if center else "")
        # One explicit commit of the staged files. (upload_folder would do the same here, but with hf_xet
        # installed it routes through the multi-commit Xet pipeline, which a tiny adapter does not need.)
        operations = [
            CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)) for path in sorted(folder.iterdir())
        ]
        return api.create_commit(
            repo_id, operations, commit_message=commit_message, revision=revision, create_pr=create_pr
        )
