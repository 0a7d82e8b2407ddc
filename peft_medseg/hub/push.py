"""Checking a center adapter folder, staging exactly what gets uploaded, and pushing it with `huggingface_hub`."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi

from ..routing import SIGNATURE_FILENAME, CenterSignature
from ..storage import EVALUATION_FILENAME, atomic_directory
from ..visual_prompt import AdapterCheck, check_adapter_folder
from ..visual_prompt.files import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from .card import DEFAULT_LICENSE, render_adapter_card, validate_card_metadata
from .evaluation_record import read_evaluation

CARD_NAME = "README.md"


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
    """Write exactly the files a push uploads: adapter config, weights, README.md, the center signature when the
    adapter folder has one (`center_signature.safetensors`, for routing) and, if given, evaluation.json.

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
    check = check_adapter_folder(adapter_dir)
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
    signature = (check.adapter_dir / SIGNATURE_FILENAME).is_file()
    if signature:
        CenterSignature.load(check.adapter_dir / SIGNATURE_FILENAME)  # a damaged signature is refused before writing

    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir}: already exists. Remove it, or pass overwrite=True (--overwrite).")
    with atomic_directory(output_dir) as staging:
        shutil.copyfile(check.adapter_dir / ADAPTER_CONFIG_NAME, staging / ADAPTER_CONFIG_NAME)
        shutil.copyfile(check.adapter_dir / ADAPTER_WEIGHTS_NAME, staging / ADAPTER_WEIGHTS_NAME)
        if signature:  # so that routers can pull it with the adapter
            shutil.copyfile(check.adapter_dir / SIGNATURE_FILENAME, staging / SIGNATURE_FILENAME)
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
