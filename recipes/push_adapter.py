"""Push a center adapter to the Hugging Face Hub with its model card and evaluation, or write the upload folder.

    # Write exactly what would be uploaded, and look at it:
    python recipes/push_adapter.py outputs/center-B --repo-id my-org/center-B \
        --evaluation outputs/center-B/eval.json --dry-run --output-dir outputs/center-B-upload

    # Push it (private repo), or open a pull request, or push to a branch:
    python recipes/push_adapter.py outputs/center-B --repo-id my-org/center-B --evaluation eval.json --private
    python recipes/push_adapter.py outputs/center-B --repo-id my-org/center-B --evaluation eval.json --create-pr
    python recipes/push_adapter.py outputs/center-B --repo-id my-org/center-B --revision v2

The Hub is reached through `huggingface_hub` (token from `HF_TOKEN` or `hf auth login`, URL from `HF_ENDPOINT`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from peft_medseg.hub import prepare_upload_folder, push_adapter_to_hub
from peft_medseg.hub.card import DEFAULT_LICENSE
from peft_medseg.training.cli import run_recipe


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter_dir", type=Path, help="Folder saved by PeftModel.save_pretrained.")
    parser.add_argument("--repo-id", required=True, help="Target model repo, namespace/name (named in the card).")
    parser.add_argument("--evaluation", type=Path, default=None, help="Evaluation JSON written by the recipes.")
    parser.add_argument("--private", action="store_true", help="Create the repo private (refuses a public one).")
    parser.add_argument("--revision", default=None, help="Branch to push to; created from main when missing.")
    parser.add_argument("--create-pr", action="store_true", help="Open a pull request against main instead.")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument(
        "--license", default=DEFAULT_LICENSE, help=f"License id for the card (default {DEFAULT_LICENSE})."
    )
    parser.add_argument("--base-model", default=None, help="Hub id of the base, if the config records a local path.")
    parser.add_argument("--dry-run", action="store_true", help="Write the upload folder instead of pushing.")
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="Dry-run folder (default: <adapter_dir>-upload)."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output-dir.")
    args = parser.parse_args(argv)
    if args.create_pr and args.revision not in (None, "main"):
        parser.error("--create-pr opens a pull request against main; drop --revision.")
    if args.output_dir is not None and not args.dry_run:
        parser.error("--output-dir only applies with --dry-run.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
