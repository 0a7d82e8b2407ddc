"""Command-line arguments shared by the training recipes (data, optimisation, accelerate, checkpoints)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .loop import TrainingConfig

DEBUG_FLAG = "--debug"


def run_recipe(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Run a recipe's `main`: an error at the edges (bad data, model, adapter, config or output folder) ends the
    program with one line on stderr naming the file, field or value and what was expected, and exit status 2.

    `--debug` anywhere on the command line shows the full traceback instead. Anything else (a bug) keeps its
    traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        status = main(argv)
    except (ValueError, OSError) as error:
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message} (--debug for the traceback)", file=sys.stderr)
        sys.exit(2)
    if isinstance(status, int):
        sys.exit(status)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """`--dataset`, `--num_labels`, `--validation_fraction`."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        default="synthetic",
        help="'synthetic' (the embedded simulated multi-center brain MRI, generated on first use), a folder "
        "<root>/<center>/images|masks (e.g. /work/shared/data/breast_us), or a datasets id / save_to_disk folder.",
    )
    group.add_argument(
        "--num_labels", type=int, default=None, help="Number of classes (default: from the data; 4 for synthetic)."
    )
    group.add_argument(
        "--validation_fraction",
        type=float,
        default=0.2,
        help="Share of each center's training cases held out for validation and best-epoch selection (by case hash).",
    )
    group.add_argument(
        "--label_map",
        nargs="+",
        default=None,
        metavar="VALUE=ID",
        help="Rewrite mask values to class ids before anything else, e.g. 255=1 for 0/255 masks.",
    )
    group.add_argument("--no_augmentation", action="store_true", help="Train without random augmentation.")


def add_training_arguments(
    parser: argparse.ArgumentParser, default_epochs: int = 10, default_batch_size: int = 8
) -> None:
    """Optimisation, accelerate and checkpointing arguments; read them back with `training_config_from_args`."""
    group = parser.add_argument_group("training")
    group.add_argument("--learning_rate", type=float, default=None, help="AdamW learning rate (default: per method).")
    group.add_argument("--num_epochs", type=int, default=default_epochs)
    group.add_argument("--batch_size", type=int, default=default_batch_size, help="Per process.")
    group.add_argument("--eval_batch_size", type=int, default=16)
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--weight_decay", type=float, default=0.0)
    group.add_argument(
        "--dice_weight", type=float, default=1.0, help="Loss = cross-entropy + dice_weight x soft Dice."
    )
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--max_train_steps", type=int, default=None, help="Stop after this many optimizer steps.")
    group.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes.")
    group = parser.add_argument_group("accelerate")
    group.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    group.add_argument(
        "--report_to", default=None, help="Tracker for accelerate, e.g. 'tensorboard' (pip install tensorboard)."
    )
    group.add_argument(
        "--checkpointing_steps",
        type=int,
        default=None,
        help="Also save the training state every N optimizer steps (every epoch end always is).",
    )
    group.add_argument(
        "--checkpoint_dir", default=None, help="Where training states go (default: <output_dir>-checkpoints)."
    )
    group.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="A checkpoint folder (step-N) or 'latest' (the newest complete one in --checkpoint_dir).",
    )


def training_config_from_args(args: argparse.Namespace, learning_rate: float) -> TrainingConfig:
    """The `TrainingConfig` of parsed arguments (`learning_rate` resolved by the caller)."""
    return TrainingConfig(
        learning_rate=learning_rate,
        num_epochs=args.num_epochs,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        weight_decay=args.weight_decay,
        dice_weight=args.dice_weight,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir or f"{str(args.output_dir).rstrip('/')}-checkpoints",
        checkpointing_steps=args.checkpointing_steps,
        resume_from_checkpoint=args.resume_from_checkpoint,
        max_train_steps=args.max_train_steps,
        num_workers=args.num_workers,
    )
