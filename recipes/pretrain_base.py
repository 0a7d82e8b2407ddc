"""Pretrain a base segmentation model on the "old" centers and save it with its image processor.

    # Offline, the tiny config on 4 synthetic centers (the embedded data is generated on first use):
    python recipes/pretrain_base.py --base tiny --centers t1w_3t t1w_1p5t t1w_3t_lowres pdw_1p5t \
        --output_dir outputs/base-tiny

    # A DINOv2 backbone from the Hub under a fresh UperNet head, on a folder dataset, two GPUs, bf16:
    accelerate launch --num_processes 2 recipes/pretrain_base.py --base facebook/dinov2-small \
        --dataset /path/to/breast_us --centers busi busbra_logiq7 --image_size 224 --mixed_precision bf16 \
        --output_dir outputs/base-dinov2-small
"""

from __future__ import annotations

import argparse
import json
from contextlib import ExitStack

from peft_medseg.models import build_image_processor
from peft_medseg.storage import atomic_directory, claim_output_dir
from peft_medseg.training import load_multicenter_dataset, make_accelerator, parse_label_map, pretrain_base
from peft_medseg.training.cli import (
    add_data_arguments,
    add_training_arguments,
    run_recipe,
    training_config_from_args,
)

# Training from scratch (tiny/small) wants a higher rate than fine-tuning a pretrained Hub backbone.
DEFAULT_LEARNING_RATE = 1e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--base", default="tiny", help="'tiny' or 'small' (offline configs) or a Hub backbone id.")
    parser.add_argument("--centers", nargs="+", default=None, help="Centers to train on (default: all).")
    parser.add_argument("--image_size", type=int, default=64, help="Side of the square model input.")
    parser.add_argument("--output_dir", required=True, help="Where the base model and its image processor go.")
    add_data_arguments(parser)
    add_training_arguments(parser, default_epochs=20, default_batch_size=16)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    accelerator = make_accelerator(
        args.mixed_precision, args.gradient_accumulation_steps, args.report_to, args.output_dir
    )
    data, id2label = load_multicenter_dataset(
        args.dataset, args.centers, args.num_labels, label_map=parse_label_map(args.label_map)
    )
    num_labels = len(id2label)
    processor = build_image_processor(args.image_size)
    config = training_config_from_args(args, args.learning_rate or DEFAULT_LEARNING_RATE)
    with ExitStack() as claims:
        if accelerator.is_main_process:  # checked before training: a full or read-only disk fails now, not later
            claims.enter_context(claim_output_dir(args.output_dir))
            claims.enter_context(claim_output_dir(config.checkpoint_dir))
        train_and_save(args, data, id2label, num_labels, processor, config, accelerator)


def train_and_save(args, data, id2label, num_labels, processor, config, accelerator) -> None:
    if args.report_to:
        accelerator.init_trackers(
            "pretrain_base", {k: v for k, v in vars(args).items() if v is None or isinstance(v, (int, float, str))}
        )
    model, result = pretrain_base(
        data,
        args.base,
        num_labels,
        processor,
        config,
        accelerator,
        image_size=args.image_size,
        id2label=id2label,
        validation_fraction=args.validation_fraction,
        augment=not args.no_augmentation,
    )
    accelerator.end_training()
    if accelerator.is_main_process:
        with atomic_directory(args.output_dir) as staging:
            model.save_pretrained(staging)
            processor.save_pretrained(staging)
            log = {
                "centers": sorted(set(data["train"]["center"])),
                "best_epoch": result.best_epoch,
                "history": result.history,
            }
            (staging / "train_log.json").write_text(json.dumps(log, indent=2))
        print(
            f"Saved the base to {args.output_dir} (best epoch {result.best_epoch}, Dice {result.best_validation_dice:.3f})."
        )


if __name__ == "__main__":
    run_recipe(main)
