r"""Pretrain a base segmentation model on the "old" centers and save it with its image processor.

    # Offline, the tiny config on 4 synthetic centers (the embedded data is generated on first use):
    python recipes/pretrain_base.py --base tiny --centers t1w_3t t1w_1p5t t1w_3t_lowres pdw_1p5t \
        --output_dir outputs/base-tiny

    # 3D: MONAI's UNETR on the embedded two-channel volumes (patch training, sliding-window validation):
    python recipes/pretrain_base.py --base unetr-tiny --dataset synthetic3d \
        --centers t1_pet_a t1_pet_b t2_pet_c pd_pet_d --output_dir outputs/base-unetr-tiny

    # A DINOv2 backbone from the Hub under a fresh UperNet head, on a folder dataset, two GPUs, bf16:
    accelerate launch --num_processes 2 recipes/pretrain_base.py --base facebook/dinov2-small \
        --dataset /path/to/breast_us --centers busi busbra_logiq7 --image_size 224 --mixed_precision bf16 \
        --output_dir outputs/base-dinov2-small
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

from peft_medseg.data import load_multicenter_dataset, parse_label_map
from peft_medseg.data.volumes import volume_channel_count
from peft_medseg.models import image_processor_for
from peft_medseg.models3d import NAMED_VOLUME_CONFIGS
from peft_medseg.storage import claim_output_dir, save_base
from peft_medseg.training import TrainingConfig, make_accelerator, pretrain_base
from peft_medseg.training.cli import (
    AccelerateArguments,
    DataArguments,
    parse_arguments,
    resolve_training_config,
    run_recipe,
)

# Training from scratch (tiny/small) wants a higher rate than fine-tuning a pretrained Hub backbone.
DEFAULT_LEARNING_RATE = 1e-3


@dataclass
class PretrainArguments:
    """Which base to build, on which centers, at which input size."""

    output_dir: str = field(metadata={"help": "Where the base model and its image processor go."})
    base: str = field(
        default="tiny",
        metadata={
            "help": "'tiny', 'tiny-encoder', 'small', 'beit-tiny' or 'segformer-tiny' (offline 2D configs), a Hub "
            "backbone id or folder, or a 3D config: 'unetr-tiny', 'unetr-small', 'unetr-base', 'swin-unetr-tiny' "
            "(MONAI; volumes)."
        },
    )
    centers: list[str] | None = field(default=None, metadata={"help": "Centers to train on (default: all)."})
    image_size: int = field(default=64, metadata={"help": "Side of the square model input (2D bases)."})


def main(argv: list[str] | None = None) -> None:
    args, data_args, run_args, training = parse_arguments(
        (PretrainArguments, DataArguments, AccelerateArguments, TrainingConfig),
        argv,
        defaults={"num_epochs": 20, "batch_size": 16},
        description=__doc__,
    )
    accelerator = make_accelerator(
        run_args.mixed_precision, training.gradient_accumulation_steps, run_args.report_to, args.output_dir
    )
    volumes = args.base in NAMED_VOLUME_CONFIGS
    data, id2label = load_multicenter_dataset(
        data_args.dataset,
        args.centers,
        data_args.num_labels,
        label_map=parse_label_map(data_args.label_map),
        volumes=volumes,
    )
    if volumes:
        processor = image_processor_for(args.base, args.image_size, volume_channel_count(data["train"]), id2label)
    else:
        processor = image_processor_for(args.base, args.image_size)
    config = resolve_training_config(training, args.output_dir, DEFAULT_LEARNING_RATE)
    with ExitStack() as claims:
        if accelerator.is_main_process:  # checked before training: a full or read-only disk fails now, not later
            claims.enter_context(claim_output_dir(args.output_dir))
            claims.enter_context(claim_output_dir(config.checkpoint_dir))
        if run_args.report_to:
            hparams = {k: v for k, v in vars(args).items() if v is None or isinstance(v, (int, float, str))}
            accelerator.init_trackers("pretrain_base", hparams)
        model, result = pretrain_base(
            data,
            args.base,
            len(id2label),
            processor,
            config,
            accelerator,
            image_size=args.image_size,
            id2label=id2label,
            validation_fraction=data_args.validation_fraction,
            augment=data_args.augmentation,
        )
        accelerator.end_training()
        if accelerator.is_main_process:
            log = {"centers": sorted(set(data["train"]["center"])), "best_epoch": result.best_epoch}
            save_base(model, processor, args.output_dir, {"train_log.json": log | {"history": result.history}})
            print(
                f"Saved the base to {args.output_dir} (best epoch {result.best_epoch}, "
                f"Dice {result.best_validation_dice:.3f})."
            )


if __name__ == "__main__":
    run_recipe(main)
