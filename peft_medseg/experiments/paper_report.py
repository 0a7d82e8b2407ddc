"""Tables and figures of a `peft_medseg.experiments.paper` run: Markdown, CSV and a PNG per held-out center."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .paper import PAPER_METHODS  # noqa: E402


def _stats(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(mean: float, std: float | None = None, digits: int = 3) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def _ratio(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.2f}×"


def _size(num_bytes: float) -> str:
    if num_bytes == 0:
        return "0"
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024:
            return f"{num_bytes:.0f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TB"


def _percent(value: float) -> str:
    return "—" if math.isnan(value) else f"{100 * value:.0f}%"


def share_of_gain(method_dice: float, direct_dice: float, full_dice: float) -> float:
    """(method - direct) / (full - direct): the share of full fine-tuning's gain on the new center that a method
    recovers (1 = as good as full fine-tuning; NaN when full fine-tuning gains nothing to share)."""
    gain = full_dice - direct_dice
    if any(math.isnan(v) for v in (method_dice, direct_dice, full_dice)) or gain <= 1e-9:
        return math.nan
    return (method_dice - direct_dice) / gain


def share_interval(
    method_images: list[float],
    direct_images: list[float],
    full_images: list[float],
    level: float = 0.95,
    num_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """A percentile bootstrap interval of `share_of_gain` over the new center's test images.

    The three lists hold each test image's Dice under the method, the base and full fine-tuning, in the same image
    order (each averaged over seeds). Images are resampled with replacement, the same images for the three models (a
    paired bootstrap), and the share is recomputed on every resample. The interval shows how much of a split's share is
    the luck of its test images: when full fine-tuning gains two or three Dice points, a few images decide it. Resamples
    where full fine-tuning gains nothing are dropped. `(nan, nan)` when the lists are missing, differ in length, or
    hold no finite value.
    """
    if not method_images or not len(method_images) == len(direct_images) == len(full_images):
        return math.nan, math.nan
    per_image = np.array([method_images, direct_images, full_images], dtype=float)
    per_image = per_image[:, np.isfinite(per_image).all(axis=0)]
    if per_image.shape[1] == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    resamples = rng.integers(per_image.shape[1], size=(num_resamples, per_image.shape[1]))
    method, direct, full = per_image[:, resamples].mean(axis=2)  # (3, num_resamples)
    gain = full - direct
    kept = gain > 1e-9
    if not kept.any():
        return math.nan, math.nan
    shares = (method[kept] - direct[kept]) / gain[kept]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(shares, [tail, 100 - tail])
    return float(low), float(high)


def _per_image_mean(runs: list[dict]) -> list[float]:
    """Each test image's new-center Dice averaged over `runs` (seeds); empty when a run lacks them or they differ in
    length (runs logged before per-image scores were recorded)."""
    lists = [r.get("new_dice_per_image") for r in runs]
    if not lists or any(not values for values in lists) or len({len(values) for values in lists}) != 1:
        return []
    return [statistics.fmean(math.nan if v is None else v for v in image) for image in zip(*lists)]


def _interval_text(interval: tuple[float, float]) -> str:
    return "" if math.isnan(interval[0]) else f" [{100 * interval[0]:.0f}–{100 * interval[1]:.0f}%]"


def across_splits(csv_rows: list[dict]) -> str:
    """Markdown: per method, the share of full fine-tuning's gain over the held-out splits (mean and worst split)."""
    lines = ["### Across splits: share of full fine-tuning's gain on the new center\n"]
    lines.append(
        "| method | trainable | splits | mean validation Dice | mean new-center Dice | mean share | "
        "worst split (share [95% bootstrap interval]) |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for method in dict.fromkeys(r["method"] for r in csv_rows):
        runs = [r for r in csv_rows if r["method"] == method]
        shares = [
            (r["share_of_full_gain"], r["held_out"], (r["share_interval_low"], r["share_interval_high"]))
            for r in runs
            if not math.isnan(r["share_of_full_gain"])
        ]
        mean_share = statistics.fmean(s for s, _, _ in shares) if shares else math.nan
        worst = min(shares) if shares else (math.nan, "—", (math.nan, math.nan))
        lines.append(
            f"| {method} | {runs[0]['trainable_percent']:.2f}% | {len(runs)} | "
            f"{_fmt(_stats([r['validation_dice_mean'] for r in runs])[0])} | "
            f"{_fmt(statistics.fmean(r['new_dice_mean'] for r in runs))} | {_percent(mean_share)} | "
            f"{worst[1]} ({_percent(worst[0])}{_interval_text(worst[2])}) |"
        )
    return "\n".join(lines) + "\n"


def summarize(rows: list[dict], output_dir: str | Path) -> str:
    """Write `summary.md`, `summary.csv`, `runs.csv` and one `figure-<center>.png` per held-out center; return the
    Markdown."""
    output_dir = Path(output_dir)
    markdown, csv_rows = [], []
    for held_out in sorted({r["held_out"] for r in rows}):
        split = [r for r in rows if r["held_out"] == held_out]
        memory_file = output_dir / f"memory-{held_out}.json"
        memory = json.loads(memory_file.read_text()) if memory_file.is_file() else {}
        full_runs = [r for r in split if r["num_train_cases"] is None]
        # The paper's methods in its order, then any other method that was run (e.g. vpt-kv).
        methods = list(PAPER_METHODS) + sorted({r["method"] for r in full_runs} - set(PAPER_METHODS))
        by_method = {m: [r for r in full_runs if r["method"] == m] for m in methods}
        by_method = {m: runs for m, runs in by_method.items() if runs}
        base_old = _stats([r["old_dice_paper"] for r in by_method.get("direct", [])])[0]
        full_seconds = _stats([r["seconds_per_epoch"] for r in by_method.get("full", [])])[0]
        seeds = sorted({r["seed"] for r in full_runs if r["method"] != "direct"})
        markdown.append(f"### New center `{held_out}` (base pretrained on the other centers; seeds {seeds})\n")
        direct_new = _stats([r["new_dice"] for r in by_method.get("direct", [])])[0]
        full_new = _stats([r["new_dice"] for r in by_method.get("full", [])])[0]
        direct_images = _per_image_mean(by_method.get("direct", []))
        full_images = _per_image_mean(by_method.get("full", []))
        markdown.append(
            "| method | trainable | trained weights on disk | new-center Dice | share of full fine-tuning's gain "
            "[95% bootstrap interval over test images] | "
            "new-center HD95 (px; volumes: mm) | "
            "old centers, paper protocol (Δ) | old centers, routed (Δ) | time/epoch vs full | peak memory vs full |"
        )
        markdown.append("|---|---|---|---|---|---|---|---|---|---|")
        for method, runs in by_method.items():
            new = _stats([r["new_dice"] for r in runs])
            hd95 = _stats([r["new_hd95"] for r in runs])
            old = _stats([r["old_dice_paper"] for r in runs])
            routed = _stats([r.get("old_dice_routed") for r in runs])
            trainable, total = runs[0]["trainable"], runs[0]["total"]
            seconds = _stats([r["seconds_per_epoch"] for r in runs])[0]
            time_ratio = seconds / full_seconds if method != "direct" and full_seconds else math.nan
            mem_ratio = memory[method] / memory["full"] if method in memory and memory.get("full") else math.nan
            routed_text = "—" if math.isnan(routed[0]) else f"{_fmt(routed[0])} ({routed[0] - base_old:+.3f})"
            share = share_of_gain(new[0], direct_new, full_new)
            interval = (
                share_interval(_per_image_mean(runs), direct_images, full_images)
                if method not in ("direct", "full") and not math.isnan(share)
                else (math.nan, math.nan)
            )
            markdown.append(
                f"| {method} | {trainable:,} ({100 * trainable / total:.2f}%) | {_size(runs[0]['weights_bytes'])} | "
                f"{_fmt(*new)} | {_percent(share)}{_interval_text(interval)} | {_fmt(*hd95, digits=2)} | {_fmt(old[0])} ({old[0] - base_old:+.3f}) | "
                f"{routed_text} | {_ratio(time_ratio)} | {_ratio(mem_ratio)} |"
            )
            csv_rows.append(
                {
                    "held_out": held_out,
                    "method": method,
                    "seeds": len(runs),
                    "trainable": trainable,
                    "trainable_percent": 100 * trainable / total,
                    "weights_bytes": runs[0]["weights_bytes"],
                    "new_dice_mean": new[0],
                    "new_dice_std": new[1],
                    "share_of_full_gain": share,
                    "share_interval_low": interval[0],
                    "share_interval_high": interval[1],
                    "validation_dice_mean": _stats([r.get("validation_dice") for r in runs])[0],
                    "new_hd95_mean": hd95[0],
                    "old_dice_paper": old[0],
                    "old_dice_routed": routed[0],
                    "base_old_dice": base_old,
                    "time_per_epoch_vs_full": time_ratio,
                    "peak_memory_vs_full": mem_ratio,
                }
            )
        per_class = sorted({label for r in full_runs for label in r.get("new_dice_aggregated") or {}}, key=int)
        if per_class:
            # Pooled over the center's voxels (HECKTOR's DSCagg): cases without a small lesion add no perfect 1s.
            markdown.append(f"\nAggregated Dice (DSCagg) per class on `{held_out}`, by class id:\n")
            markdown.append("| method | " + " | ".join(per_class) + " |")
            markdown.append("|---|" + "---|" * len(per_class))
            for method, runs in by_method.items():
                cells = [_fmt(*_stats([(r.get("new_dice_aggregated") or {}).get(c) for r in runs])) for c in per_class]
                markdown.append(f"| {method} | " + " | ".join(cells) + " |")
        shots = sorted({r["num_train_cases"] for r in split if r["num_train_cases"]})
        few_methods = sorted({r["method"] for r in split if r["num_train_cases"]})
        curves = {}
        if shots:
            markdown.append(f"\nFew-shot, new-center Dice by number of training cases of `{held_out}`:\n")
            markdown.append("| method | " + " | ".join(str(n) for n in shots) + " | all |")
            markdown.append("|---|" + "---|" * (len(shots) + 1))
            for method in few_methods:
                points = [
                    _stats([r["new_dice"] for r in split if r["method"] == method and r["num_train_cases"] == n])
                    for n in shots
                ]
                points.append(_stats([r["new_dice"] for r in by_method.get(method, [])]))
                curves[method] = points
                markdown.append(f"| {method} | " + " | ".join(_fmt(*p) for p in points) + " |")
        markdown.append("")
        _figure(held_out, by_method, base_old, shots, curves, output_dir / f"figure-{held_out}.png")

    if len({r["held_out"] for r in rows}) > 1:
        markdown.append(across_splits(csv_rows))
    text = "\n".join(markdown)
    (output_dir / "summary.md").write_text(text + "\n")
    if csv_rows:
        with (output_dir / "summary.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(csv_rows[0]))
            writer.writeheader()
            writer.writerows(csv_rows)
    with (output_dir / "runs.csv").open("w", newline="") as handle:
        fields = [k for k in rows[0] if k != "per_center_dice"] if rows else []
        fields += sorted({k for r in rows for k in r} - set(fields) - {"per_center_dice"})
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return text


def _figure(held_out, by_method, base_old, shots, curves, path: Path) -> None:
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(11 if curves else 6, 4), squeeze=False)
    ax = axes[0, 0]
    methods = list(by_method)
    new = [_stats([r["new_dice"] for r in by_method[m]]) for m in methods]
    old = [_stats([r["old_dice_paper"] for r in by_method[m]]) for m in methods]
    xs = range(len(methods))
    ax.bar([x - 0.2 for x in xs], [m for m, _ in new], 0.4, yerr=[s for _, s in new], label=f"new center ({held_out})")
    ax.bar([x + 0.2 for x in xs], [m for m, _ in old], 0.4, yerr=[s for _, s in old], label="old centers (paper)")
    ax.axhline(base_old, color="gray", linestyle="--", linewidth=1, label="old centers, base")
    ax.set_xticks(list(xs), methods, rotation=30, ha="right")
    ax.set_ylabel("mean foreground Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Adaptation to a new center")
    if curves:
        ax = axes[0, 1]
        labels = [str(n) for n in shots] + ["all"]
        for method, points in curves.items():
            ax.errorbar(
                range(len(labels)), [m for m, _ in points], yerr=[s for _, s in points], marker="o", label=method
            )
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("training cases of the new center")
        ax.set_ylabel("new-center Dice")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.set_title("Few-shot")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
