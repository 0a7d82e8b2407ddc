r"""Push a center adapter to the Hugging Face Hub with its model card and evaluation, or write the upload folder.

    # Write exactly what would be uploaded, and look at it:
    python recipes/push_adapter.py --adapter_dir outputs/center-B --repo-id my-org/center-B \
        --evaluation outputs/center-B/eval.json --dry-run --output-dir outputs/center-B-upload

    # Push it (private repo), or open a pull request, or push to a branch:
    python recipes/push_adapter.py --adapter_dir outputs/center-B --repo-id my-org/center-B --evaluation eval.json --private
    python recipes/push_adapter.py --adapter_dir outputs/center-B --repo-id my-org/center-B --evaluation eval.json --create-pr
    python recipes/push_adapter.py --adapter_dir outputs/center-B --repo-id my-org/center-B --revision v2

The Hub is reached through `huggingface_hub` (token from `HF_TOKEN` or `hf auth login`, URL from `HF_ENDPOINT`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from peft_medseg.hub import prepare_upload_folder, push_adapter_to_hub
from peft_medseg.hub.card import DEFAULT_LICENSE
from peft_medseg.training.cli import parse_arguments, run_recipe


@dataclass
class PushArguments:
    """What to push where (options also spelled with dashes: --repo-id, --dry-run, ...)."""

    adapter_dir: Path = field(metadata={"help": "Folder saved by PeftModel.save_pretrained."})
    repo_id: str = field(metadata={"help": "Target model repo, namespace/name (named in the card)."})
    evaluation: Path | None = field(default=None, metadata={"help": "Evaluation JSON written by the recipes."})
    private: bool = field(default=False, metadata={"help": "Create the repo private (refuses a public one)."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to; created from main when missing."})
    create_pr: bool = field(default=False, metadata={"help": "Open a pull request against main instead."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message of the upload."})
    license: str = field(default=DEFAULT_LICENSE, metadata={"help": "License id for the card."})
    base_model: str | None = field(
        default=None, metadata={"help": "Hub id of the base, if the adapter config records a local path."}
    )
    dry_run: bool = field(default=False, metadata={"help": "Write the upload folder instead of pushing."})
    output_dir: Path | None = field(default=None, metadata={"help": "Dry-run folder (default: <adapter_dir>-upload)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output-dir."})

    def __post_init__(self) -> None:
        if self.create_pr and self.revision not in (None, "main"):
            raise ValueError("--create-pr opens a pull request against main; drop --revision.")
        if self.output_dir is not None and not self.dry_run:
            raise ValueError("--output-dir only applies with --dry-run.")


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_arguments((PushArguments,), argv, description=__doc__)
    if args.dry_run:
        output_dir = args.output_dir or args.adapter_dir.with_name(f"{args.adapter_dir.resolve().name}-upload")
        folder = prepare_upload_folder(
            args.adapter_dir,
            output_dir,
            repo_id=args.repo_id,
            evaluation_path=args.evaluation,
            license=args.license,
            base_model=args.base_model,
            overwrite=args.overwrite,
        )
        print(f"Dry run: wrote the folder that would be pushed to {args.repo_id} at {folder}:")
        for path in sorted(folder.iterdir()):
            print(f"  {path.name} ({path.stat().st_size} bytes)")
        return 0
    commit = push_adapter_to_hub(
        args.adapter_dir,
        args.repo_id,
        evaluation_path=args.evaluation,
        private=args.private,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
        license=args.license,
        base_model=args.base_model,
    )
    print(f"Pushed to {commit.pr_url or commit.commit_url}")
    return 0


if __name__ == "__main__":
    run_recipe(main)
