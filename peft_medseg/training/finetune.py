"""The two jobs of the recipes as library functions: pretrain a base on old centers, adapt it to a new center."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import DatasetDict
from torch import nn
from torch.utils.data import DataLoader

from ..data import select_centers
from ..models import build_segmentation_model, model_num_labels
from ..models3d import is_volume_model
from ..routing import DEFAULT_FALSE_REJECTION_RATE, CenterSignature, compute_signature, volume_routing_input
from .data import eval_transform, split_validation, train_transform
from .loop import TrainingConfig, TrainingResult, train_segmentation
from .methods import (
    count_parameters,
    enable_gradient_checkpointing,
    prepare_model,
    set_train_mode,
    uses_gradient_checkpointing,
)


@dataclass
class FinetuneOutcome:
    """A fine-tuned model (in eval mode) with what the run did and what it trained on."""

    model: nn.Module
    result: TrainingResult
    trainable_parameters: int
    total_parameters: int
    num_train_cases: int
    num_train_images: int


def pretrain_base(
    data: DatasetDict,
    base: str,
    num_labels: int,
    image_processor,
    config: TrainingConfig,
    accelerator: Accelerator,
    image_size: int = 64,
    id2label: dict[int, str] | None = None,
    validation_fraction: float = 0.2,
    augment: bool = True,
) -> tuple[nn.Module, TrainingResult]:
    """Train a base segmentation model (a named config or a Hub backbone, see `build_segmentation_model`) on every
    center of `data["train"]`; returns it in eval mode with the weights of its best validation epoch."""
    set_seed(config.seed)  # the initial weights depend on it: same seed, same base
    in_channels = getattr(image_processor, "num_channels", None)  # a 3D base's VolumePreprocessing
    model = build_segmentation_model(
        base,
        num_labels,
        image_size=image_size,
        id2label=id2label,
        **({"in_channels": in_channels} if in_channels else {}),
    )
    train, validation = split_validation(data["train"], validation_fraction)
    train.set_transform(train_transform(image_processor, config.seed) if augment else eval_transform(image_processor))
    validation.set_transform(eval_transform(image_processor))
    result = train_segmentation(model, train, validation, num_labels, config, accelerator)
    return set_train_mode(accelerator.unwrap_model(model), False), result


def finetune_center(
    base: nn.Module,
    image_processor,
    data: DatasetDict,
    new_center: str,
    method: str,
    config: TrainingConfig,
    accelerator: Accelerator,
    num_train_cases: int | None = None,
    num_virtual_tokens: int | None = None,
    prompt_dropout: float = 0.1,
    train_classifier: bool = True,
    lora_rank: int = 8,
    validation_fraction: float = 0.2,
    augment: bool = True,
    gradient_checkpointing: bool | None = None,
) -> FinetuneOutcome:
    """Adapt `base` to `new_center` with `method` (see `prepare_model`) on that center's training split.

    A fixed share of the center's training cases (by case hash) validates each epoch for best-epoch selection; the
    test split is left for evaluation. `num_train_cases` keeps a deterministic few-shot subset of the rest.
    `gradient_checkpointing` recomputes the encoder's activations in the backward pass (None: on for the prompt
    methods, see `uses_gradient_checkpointing`); the gradients are the same.
    """
    train_rows = select_centers(data["train"], new_center)
    train, validation = split_validation(train_rows, validation_fraction, num_train_cases, config.seed)
    train.set_transform(train_transform(image_processor, config.seed) if augment else eval_transform(image_processor))
    validation.set_transform(eval_transform(image_processor))
    set_seed(config.seed)  # the initial prompts / head weights depend on it: same seed, same run
    model = prepare_model(
        base,
        method,
        num_virtual_tokens=num_virtual_tokens,
        prompt_dropout=prompt_dropout,
        train_classifier=train_classifier,
        lora_rank=lora_rank,
    )
    if uses_gradient_checkpointing(method, gradient_checkpointing):
        enable_gradient_checkpointing(model)
    trainable, total = count_parameters(model)
    num_labels = model_num_labels(base)
    result = train_segmentation(model, train, validation, num_labels, config, accelerator)
    model = set_train_mode(accelerator.unwrap_model(model), False)
    return FinetuneOutcome(
        model=model,
        result=result,
        trainable_parameters=trainable,
        total_parameters=total,
        num_train_cases=len(set(train["case_id"])),
        num_train_images=len(train),
    )


def _stack_pixel_values(examples: list[dict]) -> torch.Tensor:
    return torch.stack([example["pixel_values"] for example in examples])


def center_signature(
    base: nn.Module,
    image_processor,
    data: DatasetDict,
    center: str,
    validation_fraction: float = 0.2,
    false_rejection_rate: float = DEFAULT_FALSE_REJECTION_RATE,
    batch_size: int = 16,
) -> CenterSignature:
    """The routing signature of `center` (see `peft_medseg.routing`) from the frozen `base`: statistics of its
    features on the center's training cases, threshold calibrated on the same validation cases as `finetune_center`.
    Call it on the base before adapting (or on the adapted peft model: adapters are disabled while it looks).
    A volume counts by its central patch of the model's size (`volume_routing_input`)."""
    fit, calibration = split_validation(select_centers(data["train"], center), validation_fraction)
    transform = eval_transform(image_processor)
    volumes = is_volume_model(base)

    def batches(rows):
        rows = rows.select_columns(["image", "label", "center", *(["case_id"] if volumes else [])])
        rows.set_transform(transform)
        if volumes:  # whole volumes differ in size: one central patch each
            yield from (volume_routing_input(base, rows[i]["pixel_values"]) for i in range(len(rows)))
        else:
            yield from DataLoader(rows, batch_size=batch_size, collate_fn=_stack_pixel_values)

    return compute_signature(base, center, batches(fit), batches(calibration), false_rejection_rate)
