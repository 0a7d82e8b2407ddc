"""Adapt a pretrained base to one new center: visual prompts, LoRA, the decode head, the classifier, or everything.

    # Deep VPT (+ the last classifier) for the held-out synthetic center, 10 training cases:
    python recipes/finetune_center.py --base_model outputs/base-tiny --method vpt-deep --num_train_cases 10 \
        --output_dir outputs/vpt-deep-flair_1p5t

    # Baselines: --method vpt-shallow | lora | decoder | classifier | full (full/decoder/classifier save full models).
    # Two processes on CPU (gloo) or GPUs, bf16, gradient accumulation, TensorBoard, checkpoints every 50 steps:
    accelerate launch --num_processes 2 recipes/finetune_center.py --base_model outputs/base-tiny \
        --method vpt-deep --mixed_precision bf16 --gradient_accumulation_steps 2 --report_to tensorboard \
        --checkpointing_steps 50 --output_dir outputs/vpt-deep-flair_1p5t
    torchrun --nproc_per_node 2 recipes/finetune_center.py --base_model outputs/base-tiny --method vpt-deep \
        --output_dir outputs/vpt-deep-flair_1p5t

    # Killed? Continue from the newest complete checkpoint, with no lost or repeated step:
    python recipes/finetune_center.py ... --resume_from_checkpoint latest

Writes <output_dir>/ (the adapter, or the full model) with evaluation.json: Dice and HD95 on every center's test split.
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack

from peft_medseg.evaluation import absent_classes_note, evaluate_segmentation, json_scores
from peft_medseg.storage import claim_output_dir
from peft_medseg.training import (
    METHODS,
    VPT_METHODS,
    default_learning_rate,
    eval_transform,
    finetune_center,
    load_base,
    load_multicenter_dataset,
    make_accelerator,
    parse_label_map,
    save_finetuned,
    uses_gradient_checkpointing,
)
from peft_medseg.training.cli import (
    add_data_arguments,
    add_training_arguments,
    run_recipe,
    training_config_from_args,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument(
        "--base_model", required=True, help="Folder (or Hub id) of the base saved by pretrain_base.py."
    )
    parser.add_argument(
        "--method", choices=METHODS, default="vpt-deep-norms", help="vpt-deep-norms won on both datasets (README)."
    )
    parser.add_argument(
        "--new_center", default=None, help="The center to adapt to (default: the synthetic held-out center)."
    )
    parser.add_argument(
        "--eval_centers", nargs="+", default=None, help="Test centers for evaluation.json (default: all)."
    )
    parser.add_argument("--num_train_cases", type=int, default=None, help="Few-shot: training cases (default: all).")
    parser.add_argument("--num_virtual_tokens", type=int, default=10, help="Prompts per block (VPT).")
    parser.add_argument("--prompt_dropout", type=float, default=0.1, help="Dropout on the prompts (VPT).")
    parser.add_argument(
        "--prompts_only",
        action="store_true",
        help="VPT/LoRA without the last classifier (by default it trains too: most of the adaptation is there).",
    )
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument(
        "--gradient_checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Recompute encoder activations in the backward pass: same gradients, lower peak memory, slower steps "
        "(default: on for the prompt methods, off for the others).",
    )
    parser.add_argument(
        "--output_dir", required=True, help="Where the adapter (or full model) and evaluation.json go."
    )
    add_data_arguments(parser)
    add_training_arguments(parser, default_epochs=10, default_batch_size=8)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    accelerator = make_accelerator(
        args.mixed_precision, args.gradient_accumulation_steps, args.report_to, args.output_dir
    )
    # Everything that can be checked is checked before training: the base, the data and its labels, the centers,
    # and the output folders (writable, and not being written by another run).
    base, processor = load_base(args.base_model)
    num_labels = base.config.num_labels
    data, _ = load_multicenter_dataset(args.dataset, num_labels=num_labels, label_map=parse_label_map(args.label_map))
    new_center = args.new_center
    if new_center is None:
        from peft_medseg.data.synthetic import HELD_OUT_CENTER

        new_center = HELD_OUT_CENTER
    test_centers = sorted(set(data["test"]["center"]))
    if new_center not in test_centers:
        raise ValueError(f"--new_center {new_center!r}: no test rows to score it on; centers: {test_centers}.")
    if new_center not in set(data["train"]["center"]):
        raise ValueError(
            f"--new_center {new_center!r}: no training rows; centers: {sorted(set(data['train']['center']))}."
        )
    if args.eval_centers:
        unknown = sorted(set(args.eval_centers) - set(test_centers))
        if unknown:
            raise ValueError(f"--eval_centers {unknown}: no test rows; centers with test rows: {test_centers}.")
        if new_center not in args.eval_centers:
            raise ValueError(
                f"--eval_centers {args.eval_centers} leaves out the new center {new_center!r}, whose test Dice "
                "the adapter is judged by: add it."
            )
    learning_rate = args.learning_rate or default_learning_rate(args.method)
    config = training_config_from_args(args, learning_rate)
    with ExitStack() as claims:
        if accelerator.is_main_process:
            claims.enter_context(claim_output_dir(args.output_dir))
            claims.enter_context(claim_output_dir(config.checkpoint_dir))
        if args.report_to:
            hparams = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
            accelerator.init_trackers("finetune_center", hparams)
        outcome = finetune_center(
            base,
            processor,
            data,
            new_center,
            args.method,
            config,
            accelerator,
            num_train_cases=args.num_train_cases,
            num_virtual_tokens=args.num_virtual_tokens,
            prompt_dropout=args.prompt_dropout,
            train_classifier=not args.prompts_only,
            lora_rank=args.lora_rank,
            validation_fraction=args.validation_fraction,
            augment=not args.no_augmentation,
            gradient_checkpointing=args.gradient_checkpointing,
        )
        accelerator.end_training()
        if accelerator.is_main_process:
            save_evaluated(args, outcome, data, processor, num_labels, new_center, learning_rate)


def save_evaluated(args, outcome, data, processor, num_labels: int, new_center: str, learning_rate: float) -> None:
    """Score the fine-tuned model on every test center and save it with evaluation.json, atomically."""
    model, result = outcome.model, outcome.result
    trainable, total = outcome.trainable_parameters, outcome.total_parameters
    test = data["test"]
    if args.eval_centers:
        test = test.filter(lambda center: center in set(args.eval_centers), input_columns="center")
    test.set_transform(eval_transform(processor))
    scores = evaluate_segmentation(model, test, num_labels, args.eval_batch_size)
    evaluation = {
        "center": new_center,
        "method": args.method,
        "base_model": str(args.base_model),
        "dataset": str(args.dataset),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "metrics": json_scores(scores),
        "train": {
            "num_train_cases": outcome.num_train_cases,
            "epochs": args.num_epochs,
            "learning_rate": learning_rate,
            "seed": args.seed,
            "num_virtual_tokens": args.num_virtual_tokens if args.method in VPT_METHODS else None,
            "best_epoch": result.best_epoch,
            "train_seconds": round(result.train_seconds, 2),
            "peak_memory_mb": result.peak_memory_mb,
            "gradient_checkpointing": uses_gradient_checkpointing(args.method, args.gradient_checkpointing),
        },
    }
    save_finetuned(model, args.output_dir, processor, evaluation)
    print(f"Saved {args.method} for {new_center} to {args.output_dir}: test Dice {scores[new_center]['dice']:.3f}.")
    if note := absent_classes_note(scores):
        print(note)


if __name__ == "__main__":
    run_recipe(main)
