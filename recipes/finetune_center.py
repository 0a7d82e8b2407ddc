r"""Adapt a pretrained base to one new center: visual prompts, LoRA, the decode head, the classifier, or everything.

    # Deep VPT (+ the last classifier) for the held-out synthetic center, 10 training cases:
    python recipes/finetune_center.py --base_model outputs/base-tiny --method vpt-deep --num_train_cases 10 \
        --output_dir outputs/vpt-deep-flair_1p5t

    # Baselines: --method vpt-shallow | lora | decoder | classifier | full (full/decoder/classifier save full models).
    # Opt-in: --method vpt-deep-decoder (each center's own copy of the decode head in the adapter: head-sized).
    # Two processes on CPU (gloo) or GPUs, bf16, gradient accumulation, TensorBoard, checkpoints every 50 steps:
    accelerate launch --num_processes 2 recipes/finetune_center.py --base_model outputs/base-tiny \
        --method vpt-deep --mixed_precision bf16 --gradient_accumulation_steps 2 --report_to tensorboard \
        --checkpointing_steps 50 --output_dir outputs/vpt-deep-flair_1p5t
    torchrun --nproc_per_node 2 recipes/finetune_center.py --base_model outputs/base-tiny --method vpt-deep \
        --output_dir outputs/vpt-deep-flair_1p5t

    # Killed? Continue from the newest complete checkpoint, with no lost or repeated step:
    python recipes/finetune_center.py ... --resume_from_checkpoint latest

    # The same arguments from a JSON or YAML file (keys are the option names without dashes):
    python recipes/finetune_center.py finetune.yaml

Writes <output_dir>/ (the adapter, or the full model) with evaluation.json: Dice and HD95 on every center's test split.
An adapter of a 2D base also gets center_signature.safetensors: the frozen base's feature statistics on the center,
with which `predict.py --route auto` and `peft_medseg.CenterRouter` recognise the center's images (or reject foreign
ones). 3D bases (saved by `pretrain_base.py --base unetr-tiny ...`) train on random patches and are scored on whole
volumes by sliding-window inference (Dice, HD95 in mm); their default new center is `flair_pet_e`:

    python recipes/finetune_center.py --base_model outputs/base-unetr-tiny --dataset synthetic3d \
        --method vpt-deep-norms --new_center flair_pet_e --output_dir outputs/unetr-vpt-flair_pet_e
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

from peft_medseg.data import load_multicenter_dataset, parse_label_map, select_centers
from peft_medseg.models import model_num_labels
from peft_medseg.models3d import VolumePreprocessing
from peft_medseg.scoring import absent_classes_note, evaluate_segmentation, json_scores
from peft_medseg.storage import claim_output_dir, load_base, save_finetuned
from peft_medseg.training import (
    DEFAULT_METHOD,
    METHODS,
    PEFT_METHODS,
    VPT_METHODS,
    TrainingConfig,
    center_signature,
    default_learning_rate,
    default_num_virtual_tokens,
    eval_transform,
    finetune_center,
    make_accelerator,
    uses_gradient_checkpointing,
)
from peft_medseg.training.cli import (
    AccelerateArguments,
    DataArguments,
    parse_arguments,
    resolve_training_config,
    run_recipe,
)


@dataclass
class FinetuneArguments:
    """What to adapt, to which center, with which method."""

    base_model: str = field(metadata={"help": "Folder (or Hub id) of the base saved by pretrain_base.py."})
    output_dir: str = field(metadata={"help": "Where the adapter (or full model) and evaluation.json go."})
    method: str = field(
        default=DEFAULT_METHOD,
        metadata={"help": "See peft_medseg.training.METHODS; the default won in the README.", "choices": METHODS},
    )
    new_center: str | None = field(
        default=None, metadata={"help": "The center to adapt to (default: the synthetic held-out center)."}
    )
    eval_centers: list[str] | None = field(
        default=None, metadata={"help": "Test centers for evaluation.json (default: all); must include the new one."}
    )
    num_train_cases: int | None = field(default=None, metadata={"help": "Few-shot: training cases (default: all)."})
    num_virtual_tokens: int | None = field(
        default=None, metadata={"help": "Prompts per block (VPT); default: the method's own (5 for vpt-deep-head)."}
    )
    prompt_dropout: float = field(default=0.1, metadata={"help": "Dropout on the prompts (VPT)."})
    prompts_only: bool = field(
        default=False, metadata={"help": "VPT/LoRA without the last classifier (by default it trains too)."}
    )
    lora_rank: int = field(default=8, metadata={"help": "Rank of LoRA."})
    false_rejection_rate: float = field(
        default=0.05,
        metadata={
            "help": "Adapters: share of the center's own validation images the router may send to the base; sets the "
            "rejection threshold saved in center_signature.safetensors."
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute encoder activations in the backward pass: same gradients, lower peak memory, slower "
            "steps (default: on for the prompt methods, off for the others)."
        },
    )


def main(argv: list[str] | None = None) -> None:
    args, data_args, run_args, training = parse_arguments(
        (FinetuneArguments, DataArguments, AccelerateArguments, TrainingConfig), argv, description=__doc__
    )
    accelerator = make_accelerator(
        run_args.mixed_precision, training.gradient_accumulation_steps, run_args.report_to, args.output_dir
    )
    # Everything that can be checked is checked before training: the base, the data and its labels, the centers,
    # and the output folders (writable, and not being written by another run).
    base, processor = load_base(args.base_model)
    volumes = isinstance(processor, VolumePreprocessing)  # a 3D base: whole volumes, patch training
    num_labels = model_num_labels(base)
    label_map = parse_label_map(data_args.label_map)
    data, _ = load_multicenter_dataset(data_args.dataset, num_labels=num_labels, label_map=label_map, volumes=volumes)
    new_center = args.new_center
    if new_center is None:
        from peft_medseg.data.synthetic import HELD_OUT_CENTER
        from peft_medseg.data.synthetic3d import HELD_OUT_CENTERS_3D

        new_center = HELD_OUT_CENTERS_3D[0] if volumes else HELD_OUT_CENTER
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
    config = resolve_training_config(training, args.output_dir, default_learning_rate(args.method))
    with ExitStack() as claims:
        if accelerator.is_main_process:
            claims.enter_context(claim_output_dir(args.output_dir))
            claims.enter_context(claim_output_dir(config.checkpoint_dir))
        signature = None
        if args.method in PEFT_METHODS and accelerator.is_main_process:
            # Of the frozen base, before the adapter is injected: what the router compares new images with.
            signature = center_signature(
                base, processor, data, new_center, data_args.validation_fraction, args.false_rejection_rate
            )
        if run_args.report_to:
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
            validation_fraction=data_args.validation_fraction,
            augment=data_args.augmentation,
            gradient_checkpointing=args.gradient_checkpointing,
        )
        accelerator.end_training()
        if accelerator.is_main_process:
            save_evaluated(args, data_args, config, outcome, data, processor, num_labels, new_center, signature)


def save_evaluated(
    args, data_args, config, outcome, data, processor, num_labels: int, new_center: str, signature=None
) -> None:
    """Score the fine-tuned model on every test center and save it with evaluation.json, atomically."""
    model, result = outcome.model, outcome.result
    test = data["test"]
    if args.eval_centers:
        test = select_centers(test, args.eval_centers)
    test.set_transform(eval_transform(processor))
    scores = evaluate_segmentation(model, test, num_labels, config.eval_batch_size)
    evaluation = {
        "center": new_center,
        "method": args.method,
        "base_model": str(args.base_model),
        "dataset": str(data_args.dataset),
        "trainable_parameters": outcome.trainable_parameters,
        "total_parameters": outcome.total_parameters,
        "metrics": json_scores(scores),
        "train": {
            "num_train_cases": outcome.num_train_cases,
            "epochs": config.num_epochs,
            "learning_rate": config.learning_rate,
            "seed": config.seed,
            "num_virtual_tokens": (args.num_virtual_tokens or default_num_virtual_tokens(args.method))
            if args.method in VPT_METHODS
            else None,
            "best_epoch": result.best_epoch,
            "train_seconds": round(result.train_seconds, 2),
            "peak_memory_mb": result.peak_memory_mb,
            "gradient_checkpointing": uses_gradient_checkpointing(args.method, args.gradient_checkpointing),
        },
    }
    attachments = [signature.save] if signature is not None else []
    save_finetuned(model, args.output_dir, processor, evaluation, attachments)
    print(f"Saved {args.method} for {new_center} to {args.output_dir}: test Dice {scores[new_center]['dice']:.3f}.")
    if note := absent_classes_note(scores):
        print(note)


if __name__ == "__main__":
    run_recipe(main)
