"""The protocol of Saeed et al. 2023, leave-one-center-out, on our data.

For each held-out ("new") center: pretrain a base on the other centers (once, cached), then adapt it to the new
center with every method on the same split, seeds and epoch budget, and score every model on every center's test
split. `recipes/reproduce_paper.py` is the command line; this module holds the logic so it can be tested.

Methods: `direct` (the base as is), `classifier` (partial: the last 1x1 conv), `decoder` (partial: the whole decode
head), `full`, `vpt-shallow`, `vpt-deep`, `lora` (see `peft_medseg.training.methods`). Per run we record the
new-center Dice/HD95; the old-center Dice under the paper's protocol (the new-center model applied to old centers)
and, for adapters, routed (each old center through the base via `"__base__"` rows of a mixed batch); trainable
parameters; the size of the trained weights on disk; seconds per epoch; and the peak memory of one training step
(measured in a fresh process per method, since a process's peak resident memory only grows).
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..data import select_centers
from ..data.volumes import volume_channel_count
from ..models import image_processor_for, model_num_labels
from ..models3d import is_volume_base
from ..scoring import evaluate_segmentation
from ..storage import check_safe_name, save_base
from ..training import (
    METHODS,
    PEFT_METHODS,
    TrainingConfig,
    default_learning_rate,
    eval_transform,
    finetune_center,
    load_base,
    load_multicenter_dataset,
    make_accelerator,
    pretrain_base,
    uses_gradient_checkpointing,
)
from ..visual_prompt import BASE_ADAPTER_NAME
from .profiling import measure_in_fresh_process, training_step_probe

PAPER_METHODS = (
    "direct",
    "classifier",
    "decoder",
    "full",
    "vpt-shallow",
    "vpt-deep",
    "vpt-deep-norms",
    "vpt-deep-head",
    "vpt-deep-decoder",
    "lora",
)


@dataclass
class ProtocolConfig:
    """One reproduction: data, held-out centers, methods, seeds, and the budget shared by every method.

    Also the arguments of `reproduce_paper.py` (`HfArgumentParser`), so every field has a command-line option.
    """

    dataset: str = field(
        default="synthetic",
        metadata={"help": "'synthetic' (or 'synthetic3d' with a 3D base), a folder or a datasets id."},
    )
    held_out: list[str] = field(
        default_factory=list, metadata={"help": "New centers, one split each (recipe default: the synthetic one)."}
    )
    centers: list[str] | None = field(default=None, metadata={"help": "Centers to use (default: all)."})
    methods: list[str] = field(
        default_factory=lambda: list(PAPER_METHODS), metadata={"help": "'direct' or methods of prepare_model."}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Training seeds of each method."})
    few_shot_cases: list[int] = field(
        default_factory=lambda: [1, 5, 10], metadata={"help": "Few-shot sizes (training cases), besides all cases."}
    )
    few_shot_methods: list[str] = field(
        default_factory=lambda: ["vpt-deep", "full"], metadata={"help": "Methods of the few-shot curve."}
    )
    base: str = field(
        default="tiny",
        metadata={
            "help": "Named base config (tiny, tiny-encoder, small, beit-tiny, segformer-tiny; 3D: unetr-tiny, "
            "swin-unetr-tiny) or a Hub id."
        },
    )
    image_size: int = field(default=64, metadata={"help": "Side of the square model input."})
    pretrain_epochs: int = field(default=40, metadata={"help": "Epochs of each split's base."})
    pretrain_learning_rate: float = field(default=2e-3, metadata={"help": "Learning rate of the bases."})
    finetune_epochs: int = field(default=20, metadata={"help": "Epochs of every method on the new center."})
    batch_size: int = field(default=8, metadata={"help": "Fine-tuning batch size."})
    num_virtual_tokens: int | None = field(
        default=None, metadata={"help": "Prompts per block (VPT methods); default: the method's own."}
    )
    lora_rank: int = field(default=8, metadata={"help": "Rank of LoRA."})
    learning_rate: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Per-method learning rates METHOD=LR, e.g. full=1e-3 vpt-deep=3e-2 (default: "
            "DEFAULT_LEARNING_RATES). Choose them on validation Dice, never on the test split."
        },
    )
    measure_memory: bool = field(default=True, metadata={"help": "Peak training memory per method (fresh process)."})

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - {"direct", *METHODS})
        if unknown:
            raise ValueError(f"methods {unknown}: expected 'direct' or one of {list(METHODS)}.")
        self.learning_rates  # noqa: B018 - every METHOD=LR pair is checked now, not after hours of runs

    @property
    def learning_rates(self) -> dict[str, float]:
        """`learning_rate` as `{method: rate}`."""
        rates = {}
        for pair in self.learning_rate:
            method, _, value = pair.partition("=")
            if method not in METHODS or not value:
                raise ValueError(f"learning_rate {pair!r}: expected METHOD=LR with METHOD in {list(METHODS)}.")
            try:
                rates[method] = float(value)
            except ValueError:
                raise ValueError(f"learning_rate {pair!r}: {value!r} is not a number.") from None
        return rates


def _mean_old(scores: dict[str, dict[str, float]], new_center: str) -> float:
    values = [s["dice"] for c, s in scores.items() if c != new_center]
    return statistics.fmean(values) if values else math.nan


def trained_weights_bytes(model: torch.nn.Module) -> int:
    """Size on disk of the trained tensors alone (what a center must store or share), as a safetensors file."""
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trained.safetensors"
        save_file(tensors, path)
        return path.stat().st_size


def pretrained_base(cfg: ProtocolConfig, data, num_labels: int, id2label, held_out: str, folder: Path):
    """The base for one split, pretrained on every center but `held_out`; cached in `folder` with its settings."""
    settings = {k: getattr(cfg, k) for k in ("dataset", "base", "image_size", "pretrain_epochs", "batch_size")}
    settings |= {"held_out": held_out, "learning_rate": cfg.pretrain_learning_rate}
    settings_file = folder / "pretrain_settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) == settings:
        return load_base(folder)
    sources = [c for c in sorted(set(data["train"]["center"])) if c != held_out]
    volumes = is_volume_base(cfg.base)
    if volumes:
        processor = image_processor_for(cfg.base, cfg.image_size, volume_channel_count(data["train"]), id2label)
    else:
        processor = image_processor_for(cfg.base, cfg.image_size)
    # 2D bases pretrain on batches of 16 images; 3D bases on the fine-tuning batch of patches.
    config = TrainingConfig(
        learning_rate=cfg.pretrain_learning_rate,
        num_epochs=cfg.pretrain_epochs,
        batch_size=cfg.batch_size if volumes else 16,
        seed=0,
    )
    model, result = pretrain_base(
        select_centers(data, sources),
        cfg.base,
        num_labels,
        processor,
        config,
        make_accelerator(),
        image_size=cfg.image_size,
        id2label=id2label,
    )
    log = {"sources": sources, "best_epoch": result.best_epoch, "validation_dice": result.best_validation_dice}
    save_base(model, processor, folder, {"pretrain_settings.json": settings, "train_log.json": log})
    return load_base(folder)


def run_one(
    cfg, base_dir: Path, data, test, new_center: str, method: str, seed: int, num_train_cases, base_scores=None
) -> dict:
    """Adapt the cached base with one method and seed; score it on every center.

    `base_scores` (3D bases: the base's scores on `test`, computed once per split) stand for the base's rows of the
    routed evaluation: volumes are scored one per forward pass, so a routed volume of an old center runs exactly the
    base's computation (tested bit for bit), and scoring it again would only repeat it.
    """
    base, processor = load_base(base_dir)
    num_labels = model_num_labels(base)
    row = {"held_out": new_center, "method": method, "seed": seed, "num_train_cases": num_train_cases}
    if method == "direct":
        scores = base_scores or evaluate_segmentation(base, test, num_labels)
        total = sum(p.numel() for p in base.parameters())
        row |= {"trainable": 0, "total": total, "weights_bytes": 0, "seconds_per_epoch": 0.0}
        row |= {"train_cases_used": 0, "best_epoch": -1}
    else:
        lr = cfg.learning_rates.get(method, default_learning_rate(method))
        config = TrainingConfig(learning_rate=lr, num_epochs=cfg.finetune_epochs, batch_size=cfg.batch_size, seed=seed)
        outcome = finetune_center(
            base,
            processor,
            data,
            new_center,
            method,
            config,
            make_accelerator(),
            num_train_cases=num_train_cases,
            num_virtual_tokens=cfg.num_virtual_tokens,
            lora_rank=cfg.lora_rank,
        )
        model = outcome.model
        scores = evaluate_segmentation(model, test, num_labels)
        if method in PEFT_METHODS and base_scores is not None:
            routed = {c: scores[c] if c == new_center else base_scores[c] for c in scores}
            row["old_dice_routed"] = _mean_old(routed, new_center)
        elif method in PEFT_METHODS:
            # One mixed-center batch per step: "__base__" rows take the base path inside the same forward.
            route = lambda center: "default" if center == new_center else BASE_ADAPTER_NAME  # noqa: E731
            routed = evaluate_segmentation(model, test, num_labels, adapter_for_center=route)
            row["old_dice_routed"] = _mean_old(routed, new_center)
        epochs_run = max(1, len(outcome.result.history))
        row |= {
            "trainable": outcome.trainable_parameters,
            "total": outcome.total_parameters,
            "weights_bytes": trained_weights_bytes(model),
            "seconds_per_epoch": outcome.result.train_seconds / epochs_run,
            "train_cases_used": outcome.num_train_cases,
            "best_epoch": outcome.result.best_epoch,
            # What a method and its learning rate are chosen by (the test Dice is only reported).
            "validation_dice": outcome.result.best_validation_dice,
            "learning_rate": lr,
        }
    row |= {
        "new_dice": scores[new_center]["dice"],
        "new_hd95": scores[new_center]["hd95"],
        # Per foreground class (JSON keys are strings): mean per case, and pooled over the center's voxels.
        "new_dice_per_class": {str(k): v for k, v in scores[new_center]["dice_per_class"].items()},
        "new_dice_aggregated": {str(k): v for k, v in scores[new_center]["dice_aggregated"].items()},
        # Per test image, in the same order for every run of the split: the share's confidence interval pairs them.
        "new_dice_per_image": scores[new_center]["dice_per_image"],
        "old_dice_paper": _mean_old(scores, new_center),
        "per_center_dice": {c: s["dice"] for c, s in scores.items()},
    }
    if method == "direct":
        row["old_dice_routed"] = row["old_dice_paper"]
    return row


def measure_training_memory(
    base_dir: str | Path, method: str, batch_size: int, num_virtual_tokens: int | None = None
) -> float:
    """Peak memory growth (MB) of a training step of `method` on the saved base, in a fresh process, with activation
    checkpointing where `finetune_center` uses it (`uses_gradient_checkpointing`)."""
    probe = measure_in_fresh_process(
        training_step_probe,
        base=str(base_dir),
        method=method,
        batch_size=batch_size,
        num_virtual_tokens=num_virtual_tokens,
        gradient_checkpointing=uses_gradient_checkpointing(method),
    )
    return probe["peak_mb"]


def run_protocol(cfg: ProtocolConfig, output_dir: str | Path, progress=print) -> list[dict]:
    """Every run of the protocol; rows are appended to `output_dir/runs.jsonl` as they finish (a resumable log)."""
    output_dir = Path(output_dir)
    data, id2label = load_multicenter_dataset(cfg.dataset, cfg.centers, volumes=is_volume_base(cfg.base))
    num_labels = len(id2label)
    centers = set(data["train"]["center"])
    for held_out in cfg.held_out:
        # Held-out names become folder names: only safe names, and only centers of the data.
        check_safe_name(held_out, "held-out center")
        if held_out not in centers:
            raise ValueError(f"held-out center {held_out!r} is not in the data; centers: {sorted(centers)}.")
    output_dir.mkdir(parents=True, exist_ok=True)
    log = output_dir / "runs.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    key = lambda r: (r["held_out"], r["method"], r["seed"], r["num_train_cases"])  # noqa: E731
    finished = {key(r) for r in done}
    rows = list(done)
    for held_out in cfg.held_out:
        base_dir = output_dir / f"base-without-{held_out}"
        progress(f"[{held_out}] base pretrained on the other centers -> {base_dir}")
        _, processor = pretrained_base(cfg, data, num_labels, id2label, held_out, base_dir)
        test = data["test"]
        test.set_transform(eval_transform(processor))
        base_scores = None
        if is_volume_base(cfg.base) and any(
            (held_out, m, s, None) not in finished for m in cfg.methods for s in cfg.seeds
        ):
            base_model, _ = load_base(base_dir)
            base_scores = evaluate_segmentation(base_model, test, model_num_labels(base_model))
        # Seed by seed: the first seed of every method finishes before the second starts, so a long reproduction
        # gives a complete (if single-seed) comparison early.
        plan = [(m, s, None) for s in cfg.seeds for m in cfg.methods if m != "direct" or s == cfg.seeds[0]]
        plan += [(m, s, n) for m in cfg.few_shot_methods for s in cfg.seeds for n in cfg.few_shot_cases if n]
        for method, seed, cases in plan:
            if (held_out, method, seed, cases) in finished:
                continue
            progress(f"[{held_out}] {method} seed={seed} cases={cases or 'all'}")
            row = run_one(cfg, base_dir, data, test, held_out, method, seed, cases, base_scores)
            rows.append(row)
            with log.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        if cfg.measure_memory:
            memory_file = output_dir / f"memory-{held_out}.json"
            memory = json.loads(memory_file.read_text()) if memory_file.is_file() else {}
            for method in cfg.methods:
                if method != "direct" and method not in memory:
                    memory[method] = measure_training_memory(base_dir, method, cfg.batch_size, cfg.num_virtual_tokens)
            memory_file.write_text(json.dumps(memory, indent=2))
    (output_dir / "protocol.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
    return rows
