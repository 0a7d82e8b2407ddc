"""The accelerate training loop shared by pretraining and center fine-tuning, with mid-epoch resume."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..data import collate_segmentation
from ..scoring import evaluate_segmentation, mean_dice, segmentation_logits
from ..storage import atomic_directory, check_no_pickle, recover_interrupted_write
from .checkpoint import (
    STATE_FILENAME,
    check_same_run,
    load_training_state,
    run_fingerprint,
    save_training_state,
    trainable_state,
)
from .loss import segmentation_loss
from .methods import set_train_mode

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
LEFTOVER_PATTERN = re.compile(r"^\.(step-\d+)\.(tmp|old)-")
# Settings that do not change what a run computes: a run may be resumed with other values of these.
RESUMABLE_WITH_OTHER = ("eval_batch_size", "checkpoint_dir", "checkpointing_steps", "resume_from_checkpoint")
RESUMABLE_WITH_OTHER += ("max_train_steps", "num_workers")


@dataclass
class TrainingConfig:
    """Settings of `train_segmentation`, and the training arguments of the recipes (`HfArgumentParser`).

    Steps count optimizer updates (one per `gradient_accumulation_steps` batches).
    """

    learning_rate: float | None = field(
        default=None, metadata={"help": "AdamW learning rate (recipes: default per method, DEFAULT_LEARNING_RATES)."}
    )
    num_epochs: int = field(default=10, metadata={"help": "Epochs over the training rows."})
    batch_size: int = field(default=8, metadata={"help": "Training batch size per process."})
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of validation and test scoring."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps before the cosine decay to 0."})
    dice_weight: float = field(default=1.0, metadata={"help": "Loss = cross-entropy + dice_weight x soft Dice."})
    seed: int = field(default=0, metadata={"help": "Seeds the initial weights, the sampler and augmentation."})
    checkpoint_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where training states (step-N/) go; None: no checkpoints (recipes: <output_dir>-checkpoints)."
        },
    )
    checkpointing_steps: int | None = field(
        default=None, metadata={"help": "Also checkpoint every N optimizer steps (every epoch end always is)."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder (step-N), or 'latest': the newest complete one in checkpoint_dir."},
    )
    max_train_steps: int | None = field(
        default=None, metadata={"help": "Stop after this many optimizer steps in total (a budget)."}
    )
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})


@dataclass
class TrainingResult:
    """What a run did: the best epoch by validation Dice, the history, the time and the peak accelerator memory."""

    best_epoch: int
    best_validation_dice: float
    completed_steps: int
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    peak_memory_mb: float | None = None
    # True when `max_train_steps` ended the run before `num_epochs`; the partial epoch was still validated.
    stopped_early: bool = False


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The checkpoint with the most steps in `checkpoint_dir` (complete ones only: they are renamed into place)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    for leftover in checkpoint_dir.iterdir():  # what a killed save left behind: put back, or clean up
        if match := LEFTOVER_PATTERN.match(leftover.name):
            recover_interrupted_write(checkpoint_dir / match.group(1))
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    found = [(steps, p) for steps, p in found if (p / STATE_FILENAME).is_file()]
    return max(found)[1] if found else None


def train_segmentation(
    model: nn.Module,
    train_dataset: Dataset,
    validation_dataset: Dataset,
    num_labels: int,
    config: TrainingConfig,
    accelerator: Accelerator,
) -> TrainingResult:
    """Train `model`'s trainable parameters with AdamW, cross-entropy + soft Dice and a cosine schedule.

    Validation (mean over centers of the mean foreground Dice) runs after every epoch, and the model ends with the
    weights of the best epoch. `train_dataset` must carry a transform with `set_epoch` (`train_transform`) or none
    needing it. Every epoch end, and every `checkpointing_steps` steps, the full accelerate state (model, optimizer,
    scheduler, RNGs, sampler) and the best weights so far are written atomically to `checkpoint_dir/step-<N>`;
    `resume_from_checkpoint` continues from one with no lost or repeated step, also mid-epoch.

    Build `accelerator` with `make_accelerator` (it needs the seedable sampler for exact resume).
    """
    set_seed(config.seed)
    if config.learning_rate is None:
        raise ValueError("TrainingConfig.learning_rate is None: give one (the recipes default it per method).")
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("The model has no trainable parameters.")
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    # A private generator for the loader's worker seeds keeps the global RNG (prompt dropout) untouched by `iter()`.
    loader = DataLoader(
        train_dataset,
        batch_size=config.batch_size,
        shuffle=True,
        collate_fn=collate_segmentation,
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed),
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    total_steps = config.num_epochs * steps_per_epoch
    if config.max_train_steps is not None:
        total_steps = min(total_steps, config.max_train_steps)
    # transformers' cosine schedule (optional linear warmup), unprepared and stepped once per optimizer update, so it
    # is the same on any process count.
    scheduler = get_scheduler(
        "cosine",
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=config.num_epochs * steps_per_epoch,
    )
    unwrapped = accelerator.unwrap_model(model)
    settings = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_WITH_OTHER}
    run = run_fingerprint(unwrapped, settings, {"train": train_dataset, "validation": validation_dataset})
    state = {"completed_steps": 0, "epoch": 0, "batches_in_epoch": 0, "best_dice": -1.0, "best_epoch": -1}
    state.update({"history": [], "train_seconds": 0.0, "run": run})
    best: dict[str, torch.Tensor] | None = None
    resume = _resolve_resume(config)
    if resume is not None:
        check_no_pickle(resume)
        recorded = _read_state(resume).get("run")
        check_same_run(resume, recorded, run)
        state, best = load_training_state(
            resume, unwrapped, optimizer, scheduler, accelerator.scaler, accelerator.process_index
        )
        accelerator.print(f"Resumed from {resume}: epoch {state['epoch']}, step {state['completed_steps']}.")

    progress = tqdm(total=total_steps, initial=state["completed_steps"], disable=not accelerator.is_local_main_process)
    started = time.perf_counter() - state["train_seconds"]
    stopped_early = False
    for epoch in range(state["epoch"], config.num_epochs):
        set_train_mode(model)
        loader.set_epoch(epoch)
        if isinstance(train_dataset, Dataset):
            transform = train_dataset.format["format_kwargs"].get("transform")
            if hasattr(transform, "set_epoch"):
                transform.set_epoch(epoch)
        skip = state["batches_in_epoch"] if epoch == state["epoch"] else 0
        active = accelerator.skip_first_batches(loader, skip) if skip else loader
        batches_in_epoch, running_loss = skip, 0.0
        for batch in active:
            with accelerator.accumulate(model):
                logits = segmentation_logits(model, batch["pixel_values"])
                loss = segmentation_loss(logits, batch["labels"], dice_weight=config.dice_weight)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            batches_in_epoch += 1
            running_loss += loss.item()
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state["completed_steps"] += 1
            progress.update(1)
            progress.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
            accelerator.log(
                {"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0]}, state["completed_steps"]
            )
            state.update(epoch=epoch, batches_in_epoch=batches_in_epoch)
            if config.checkpointing_steps and state["completed_steps"] % config.checkpointing_steps == 0:
                _save_checkpoint(accelerator, config, state, started, best, unwrapped, optimizer, scheduler)
            if config.max_train_steps is not None and state["completed_steps"] >= config.max_train_steps:
                stopped_early = batches_in_epoch < len(loader) or epoch + 1 < config.num_epochs
                break
        # Every process validates on the whole (small) validation set, so all agree on the best epoch.
        scores = evaluate_segmentation(
            unwrapped, validation_dataset, num_labels, config.eval_batch_size, compute_hd95=False
        )
        dice = mean_dice(scores)
        record = {"epoch": epoch, "step": state["completed_steps"], "validation_dice": dice}
        record["train_loss"] = running_loss / max(batches_in_epoch - skip, 1)
        state["history"].append(record)
        accelerator.log({"validation/dice": dice}, state["completed_steps"])
        if dice > state["best_dice"]:
            state.update(best_dice=dice, best_epoch=epoch)
            best = trainable_state(unwrapped)
        accelerator.print(
            f"epoch {epoch}: validation Dice {dice:.4f} (best {state['best_dice']:.4f} @ {state['best_epoch']})"
        )
        if stopped_early:
            break  # the budget ran out mid-run: the last checkpoint is the resume point, not this partial epoch
        state.update(epoch=epoch + 1, batches_in_epoch=0)
        _save_checkpoint(accelerator, config, state, started, best, unwrapped, optimizer, scheduler)
    progress.close()
    accelerator.wait_for_everyone()
    if best is not None:
        unwrapped.load_state_dict(best, strict=False)
    state["train_seconds"] = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return TrainingResult(
        best_epoch=state["best_epoch"],
        best_validation_dice=state["best_dice"],
        completed_steps=state["completed_steps"],
        history=state["history"],
        train_seconds=state["train_seconds"],
        peak_memory_mb=peak,
        stopped_early=stopped_early,
    )


def _resolve_resume(config: TrainingConfig) -> Path | None:
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == "latest":
        if config.checkpoint_dir is None:
            raise ValueError("resume_from_checkpoint='latest' needs a checkpoint_dir.")
        return latest_checkpoint(config.checkpoint_dir)
    path = Path(config.resume_from_checkpoint)
    if not (path / STATE_FILENAME).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {STATE_FILENAME}).")
    return path


def _read_state(folder: Path) -> dict:
    try:
        return json.loads((folder / STATE_FILENAME).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder / STATE_FILENAME}: unreadable checkpoint state ({error}).") from error


def _save_checkpoint(
    accelerator: Accelerator, config: TrainingConfig, state: dict, started: float, best, model, optimizer, scheduler
) -> None:
    if config.checkpoint_dir is None:
        return
    state["train_seconds"] = time.perf_counter() - started
    target = Path(config.checkpoint_dir) / f"step-{state['completed_steps']:06d}"
    # Every process writes its own RNG state into the same folder, so the staging name is fixed, not random; only the
    # main process renames it into place once it is complete, and `latest_checkpoint` ignores dot-folders.
    staging = Path(config.checkpoint_dir) / f".{target.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_training_state(
        staging,
        model,
        optimizer,
        scheduler,
        accelerator.scaler,
        state,
        best,
        write_shared=accelerator.is_main_process,
        rank=accelerator.process_index,
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_directory(target) as final:
            final.rmdir()
            os.rename(staging, final)
    accelerator.wait_for_everyone()


def make_accelerator(
    mixed_precision: str = "no",
    gradient_accumulation_steps: int = 1,
    report_to: str | None = None,
    project_dir: str | None = None,
) -> Accelerator:
    """An `Accelerator` for `train_segmentation`: seedable sampler (exact resume), optional tracker (e.g. tensorboard).

    Launched on several processes (`torchrun`, `accelerate launch`) on a machine without CUDA, it runs data parallel
    on CPU (gloo): accelerate only picks `MULTI_CPU` when asked for the CPU.
    """
    multi_process_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(
        cpu=multi_process_cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=report_to,
        project_dir=project_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


__all__ = [
    "TrainingConfig",
    "TrainingResult",
    "latest_checkpoint",
    "make_accelerator",
    "train_segmentation",
]
