"""Overhead of visual prompts, as ratios measured within one run (machines are noisy; ratios are not).

    python recipes/bench_overhead.py                 # ViT-S-sized UperNet, 224 px, batch 8, CPU, with cost curves
    python recipes/bench_overhead.py --quick         # a small config, for a smoke run
    python recipes/bench_overhead.py --3d            # MONAI UNETR at 96³ with ViT-B widths (the paper's model)

Measures: inference latency of deep VPT vs the bare base (deep prompts as keys/values, and the token path they
replace); a mixed batch over 4 centers vs the same batch under one adapter and vs a per-sample loop with
`set_adapter`; time and peak memory of one training step of VPT (with and without activation checkpointing), LoRA and
full fine-tuning (peak resident memory, each step in its own process). Cost curves (`--curves`, on by default): latency
overhead against the number of prompts and the image size; training peak memory against the backbone width (ViT-S,
ViT-B, ViT-L); mixed-batch throughput against the number of centers in a batch. Writes JSON, Markdown and PNGs.

`--3d` measures the paper's own model instead: deep VPT vs the bare MONAI UNETR (ViT-B widths, 96³ patches of
16³, 2 channels, batch 1) in inference latency and FLOPs, and the peak memory and time of a training step of the
prompt methods (with activation checkpointing, as the recipes train them; the default also without) and LoRA against
full fine-tuning (also with checkpointing).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import torch
from peft import get_peft_model
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count
from tqdm.auto import tqdm
from transformers import SegformerConfig, SegformerForSemanticSegmentation

import peft_medseg
from peft_medseg.experiments.profiling import measure_in_fresh_process, training_step_probe
from peft_medseg.models import NAMED_CONFIGS, build_segmentation_model
from peft_medseg.models3d import volume_in_channels, volume_roi_size
from peft_medseg.training import DEFAULT_METHOD, prepare_model
from peft_medseg.visual_prompt.kv_layer import DeepKeyValuePromptLayer

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Backbone widths of the memory curve (DINOv2 blocks under an UperNet head, random init). ViT-S is the `small` base.
WIDTHS = {
    "ViT-S": NAMED_CONFIGS["small"],
    "ViT-B": NAMED_CONFIGS["small"] | dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "ViT-L": NAMED_CONFIGS["small"]
    | dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
# Training-step variants of the memory curve: (method of `prepare_model`, activation checkpointing).
TRAIN_VARIANTS = {
    "full": ("full", False),
    "lora": ("lora", False),
    "vpt-deep": ("vpt-deep", False),
    "vpt-deep + checkpointing": ("vpt-deep", True),
    # The default: prompts, head norms, head and MLP updates, depthwise head filters (as the recipes train it).
    "vpt-deep-head + checkpointing": ("vpt-deep-head", True),
}


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # torch counts SDPA FLOPs for the GPU kernels only; the CPU kernel does the same work.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn) -> int:
    """FLOPs of one call: exact and noise-free, unlike a CPU latency (matmuls, convolutions and attention)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def interleaved_fastest(fns: dict, repeats: int) -> dict[str, float]:
    """Fastest time of each function over `repeats` rounds, measured round-robin so that drift in machine load hits
    all of them alike. Interference only ever adds time to a CPU-bound run, so the fastest of several is the least
    noisy estimate of its cost (medians of 10 moved by ±5% between runs here; minima by about 1%)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def build(config_name: str | dict, image_size: int):
    torch.manual_seed(0)
    return build_segmentation_model(config_name, num_labels=4, image_size=image_size).eval()


def centers_model(base, num_centers: int, num_virtual_tokens: int, batch_size: int, **config):
    """A copy of `base` with `num_centers` adapters (the first active), and a batch's worth of mixed center names."""
    centers = [f"center-{i}" for i in range(num_centers)]
    config = dict(num_virtual_tokens=num_virtual_tokens, **config)
    model = get_peft_model(copy.deepcopy(base), peft_medseg.VisualPromptConfig(**config), adapter_name=centers[0])
    for name in centers[1:]:
        model.add_adapter(name, peft_medseg.VisualPromptConfig(**config))
    model.set_adapter(centers[0])
    return model.eval(), centers, [centers[i % num_centers] for i in range(batch_size)]


def four_centers(base, args, **config):
    return centers_model(base, 4, args.num_virtual_tokens, args.batch_size, **config)


@contextmanager
def token_path():
    """Run deep prompts the way they ran before they became keys/values: as tokens through the whole block."""
    runs_as_key_values = DeepKeyValuePromptLayer.runs_as_key_values
    DeepKeyValuePromptLayer.runs_as_key_values = lambda self, rows: False
    try:
        yield
    finally:
        DeepKeyValuePromptLayer.runs_as_key_values = runs_as_key_values


def run_token_path(model, **inputs):
    with token_path():
        return model(**inputs)


def bench_inference(args) -> dict:
    base = build(args.config, args.image_size)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    model, centers, mixed_names = four_centers(base, args, deep=True)
    # The default adapter as the recipes train it (its own prompt count, classifier, head norms, the rank-2 head update
    # with its depthwise head filters, the rank-1 MLP updates), in eval mode: what serving a center with it costs.
    default = prepare_model(copy.deepcopy(base), DEFAULT_METHOD).eval()

    def per_sample_loop():
        for i, name in enumerate(mixed_names):
            model.set_adapter(name)
            model(pixel_values=x[i : i + 1])
        model.set_adapter(centers[0])

    with torch.inference_mode():
        t = interleaved_fastest(
            {
                "base": lambda: base(pixel_values=x),
                "vpt": lambda: model(pixel_values=x),
                "default": lambda: default(pixel_values=x),
                "vpt_tokens": lambda: run_token_path(model, pixel_values=x),
                "mixed": lambda: model(pixel_values=x, adapter_names=mixed_names),
                "loop": per_sample_loop,
            },
            args.repeats,
        )
    base_flops = count_flops(lambda: base(pixel_values=x))
    return {
        "vpt_vs_base_flops": count_flops(lambda: model(pixel_values=x)) / base_flops,
        "default_vs_base_flops": count_flops(lambda: default(pixel_values=x)) / base_flops,
        "vpt_token_path_vs_base_flops": count_flops(lambda: run_token_path(model, pixel_values=x)) / base_flops,
        "base_ms": 1000 * t["base"],
        "vpt_deep_ms": 1000 * t["vpt"],
        "vpt_deep_token_path_ms": 1000 * t["vpt_tokens"],
        "mixed_4_centers_ms": 1000 * t["mixed"],
        "per_sample_loop_ms": 1000 * t["loop"],
        "vpt_vs_base": t["vpt"] / t["base"],
        "default_vs_base": t["default"] / t["base"],
        "vpt_token_path_vs_base": t["vpt_tokens"] / t["base"],
        "mixed_vs_single_adapter": t["mixed"] / t["vpt"],
        "mixed_speedup_vs_loop": t["loop"] / t["mixed"],
    }


def latency_curve(args) -> list[dict]:
    """Deep VPT / base latency against the number of prompts (at `image_size`) and the image size (10 prompts)."""
    points = [(args.image_size, n) for n in (1, 10, 50, 100)] + [(2 * args.image_size, 10)]
    return [latency_point(args, size, prompts) for size, prompts in tqdm(points, desc="latency curve")]


def latency_point(args, image_size: int, num_prompts: int) -> dict:
    base = build(args.config, image_size)
    x = torch.randn(args.batch_size, 3, image_size, image_size)
    model, _, _ = centers_model(base, 1, num_prompts, args.batch_size)
    with torch.inference_mode():
        t = interleaved_fastest(
            {
                "base": lambda: base(pixel_values=x),
                "vpt": lambda: model(pixel_values=x),
                "vpt_tokens": lambda: run_token_path(model, pixel_values=x),
            },
            args.curve_repeats,
        )
    base_flops = count_flops(lambda: base(pixel_values=x))
    return {
        "key_value_vs_base_flops": count_flops(lambda: model(pixel_values=x)) / base_flops,
        "token_path_vs_base_flops": count_flops(lambda: run_token_path(model, pixel_values=x)) / base_flops,
        "image_size": image_size,
        "num_virtual_tokens": num_prompts,
        "base_ms": 1000 * t["base"],
        "key_value_vs_base": t["vpt"] / t["base"],
        "token_path_vs_base": t["vpt_tokens"] / t["base"],
    }


def mixed_curve(args) -> list[dict]:
    """Throughput of one mixed batch against the number of centers in it, vs per-sample and per-center passes."""
    base = build(args.config, args.image_size)
    return [mixed_point(args, base, n) for n in tqdm((1, 2, 4, 8), desc="mixed-batch curve")]


def mixed_point(args, base, num_centers: int) -> dict:
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    model, centers, names = centers_model(base, num_centers, args.num_virtual_tokens, args.batch_size)

    def per_sample():
        for i, name in enumerate(names):
            model.set_adapter(name)
            model(pixel_values=x[i : i + 1])

    def per_center():
        for name in centers:
            model.set_adapter(name)
            model(pixel_values=x[[i for i, n in enumerate(names) if n == name]])

    with torch.inference_mode():
        t = interleaved_fastest(
            {
                "mixed": lambda: model(pixel_values=x, adapter_names=names),
                "per_sample": per_sample,
                "per_center": per_center,
            },
            args.curve_repeats,
        )
    return {
        "num_centers": num_centers,
        "mixed_images_per_s": args.batch_size / t["mixed"],
        "per_sample_images_per_s": args.batch_size / t["per_sample"],
        "per_center_images_per_s": args.batch_size / t["per_center"],
        "mixed_speedup_vs_per_sample": t["per_sample"] / t["mixed"],
        "mixed_speedup_vs_per_center": t["per_center"] / t["mixed"],
    }


MIT_SIZES = {  # SegFormer's MiT encoders (SegformerConfig's defaults are b0); b1..b5 share b2's widths
    "b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], decoder_hidden_size=256),
    "b2": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3], decoder_hidden_size=768),
}


def bench_segformer(args, size: str = "b0") -> dict:
    """SegFormer (MiT, random init, offline) with key/value prompts vs the bare base: inference latency ratios.

    Key/value prompts join the spatially reduced keys/values of every attention layer, so their cost is
    num_virtual_tokens extra keys per layer plus the prompts' own key/value projections.
    """
    torch.manual_seed(0)
    base = SegformerForSemanticSegmentation(SegformerConfig(num_labels=4, **MIT_SIZES[size])).eval()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    model, centers, mixed_names = four_centers(base, args, prompt_mode="key_value")
    with torch.inference_mode():
        t = interleaved_fastest(
            {
                "base": lambda: base(pixel_values=x),
                "kv": lambda: model(pixel_values=x),
                "mixed": lambda: model(pixel_values=x, adapter_names=mixed_names),
            },
            args.repeats,
        )
    trainable, _ = model.get_nb_trainable_parameters()
    return {
        "mit_size": size,
        "base_ms": 1000 * t["base"],
        "kv_prompts_ms": 1000 * t["kv"],
        "mixed_4_centers_ms": 1000 * t["mixed"],
        "kv_vs_base": t["kv"] / t["base"],
        "mixed_vs_single_adapter": t["mixed"] / t["kv"],
        "trainable_per_center": trainable // len(centers),
    }


def train_step(variant: str, width: str, repeats: int, args) -> dict:
    """Peak memory growth and step time of one variant, in a fresh process so methods do not share an allocator."""
    method, checkpointing = TRAIN_VARIANTS[variant]
    result = measure_in_fresh_process(
        training_step_probe,
        base=NAMED_CONFIGS["tiny"] if args.quick else WIDTHS[width],
        method=method,
        batch_size=args.batch_size,
        image_size=args.image_size,
        # The default method with its own prompt count, as the recipes train it; the others with --num_virtual_tokens.
        num_virtual_tokens=None if method == DEFAULT_METHOD else args.num_virtual_tokens,
        gradient_checkpointing=checkpointing,
        repeats=repeats,
    )
    return {"step_s": result["step_s"], "peak_mb_above_model": result["peak_mb"], "trainable": result["trainable"]}


def bench_training(args) -> dict:
    """Every variant at ViT-S, with step times."""
    results = {
        v: train_step(v, "ViT-S", args.train_repeats, args) for v in tqdm(TRAIN_VARIANTS, desc="training steps")
    }
    full = results["full"]
    return {
        variant: result
        | {
            "time_vs_full": result["step_s"] / full["step_s"],
            "memory_vs_full": result["peak_mb_above_model"] / full["peak_mb_above_model"],
        }
        for variant, result in results.items()
    }


def memory_curve(args) -> list[dict]:
    """Training-step peak memory of each variant against the backbone width (one step each, ViT-S reused)."""
    rows = []
    for width in tqdm([w for w in WIDTHS if w != "ViT-S"], desc="memory curve"):
        results = {v: train_step(v, width, 0, args) for v in TRAIN_VARIANTS}
        full = results["full"]["peak_mb_above_model"]
        for variant, result in results.items():
            rows.append(
                {"width": width, "variant": variant, "peak_mb": result["peak_mb_above_model"]}
                | {"memory_vs_full": result["peak_mb_above_model"] / full, "trainable": result["trainable"]}
            )
    return rows


def plot_curves(results: dict, folder: Path) -> list[Path]:
    paths = []
    latency = results.get("latency_curve")
    if latency:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        size = results["setup"]["image_size"]
        same_size = [r for r in latency if r["image_size"] == size]
        for key, label, style in (
            ("key_value_vs_base", "latency, keys/values", "o-C0"),
            ("token_path_vs_base", "latency, token path", "o-C1"),
            ("key_value_vs_base_flops", "FLOPs, keys/values", "s--C0"),
            ("token_path_vs_base_flops", "FLOPs, token path", "s--C1"),
        ):
            ax.plot([r["num_virtual_tokens"] for r in same_size], [r[key] for r in same_size], style, label=label)
        for r in latency:
            if r["image_size"] != size:
                ax.scatter([r["num_virtual_tokens"]], [r["key_value_vs_base"]], marker="s", color="C0")
                ax.annotate(f"{r['image_size']} px", (r["num_virtual_tokens"], r["key_value_vs_base"]))
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(
            xscale="log", xlabel="prompts per block", ylabel="latency / base", title=f"Inference overhead, {size} px"
        )
        ax.legend()
        paths.append(_save(fig, folder / "latency_curve.png"))
    memory = results.get("memory_curve")
    if memory and results.get("training"):
        small = [
            {"width": "ViT-S", "variant": v, "peak_mb": r["peak_mb_above_model"]}
            for v, r in results["training"].items()
        ]
        memory = small + memory
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        widths = list(dict.fromkeys(r["width"] for r in memory))
        for variant in TRAIN_VARIANTS:
            values = [
                next(r["peak_mb"] for r in memory if r["width"] == w and r["variant"] == variant) for w in widths
            ]
            ax.plot(widths, values, "o-", label=variant)
        ax.set(ylabel="training step peak memory (MB)", title="Training memory vs backbone width")
        ax.legend()
        paths.append(_save(fig, folder / "memory_curve.png"))
    mixed = results.get("mixed_curve")
    if mixed:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        counts = [r["num_centers"] for r in mixed]
        for key, label in (
            ("mixed_images_per_s", "one mixed batch"),
            ("per_center_images_per_s", "one pass per center"),
            ("per_sample_images_per_s", "one pass per sample"),
        ):
            ax.plot(counts, [r[key] for r in mixed], "o-", label=label)
        ax.set(xlabel="centers in a batch", ylabel="images / s", xticks=counts, title="Serving several centers")
        ax.legend()
        paths.append(_save(fig, folder / "mixed_curve.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(results: dict) -> str:
    args = results["setup"]
    inf, tr, seg = results.get("inference"), results.get("training", {}), results.get("segformer")
    if args["sections"] == ["3d"]:
        setup = (
            f"Setup: {args['config_3d']}, batch 1, {args['num_virtual_tokens']} prompts, {args['device']}, "
            f"{args['threads']} threads; fastest of {args['repeats_3d']} round-robin runs."
        )
    else:
        setup = (
            f"Setup: {args['config']} base, {args['image_size']} px, batch {args['batch_size']}, "
            f"{args['num_virtual_tokens']} prompts, {args['device']}, {args['threads']} threads; fastest of "
            f"{args['repeats']} (curves: {args['curve_repeats']}) round-robin runs."
        )
    lines = [
        setup,
        "",
        "| measure | value | target |",
        "|---|---|---|",
    ]
    if inf:
        lines += [
            f"| deep VPT / base, inference latency (keys/values) | {inf['vpt_vs_base']:.3f}× | ≤ 1.03× |",
            f"| deep VPT / base, inference latency (token path, before) | {inf['vpt_token_path_vs_base']:.3f}× | — |",
            f"| deep VPT / base, FLOPs: keys/values vs token path | {inf['vpt_vs_base_flops']:.4f}× vs "
            f"{inf['vpt_token_path_vs_base_flops']:.4f}× | — |",
            f"| {DEFAULT_METHOD} (the default adapter) / base, inference latency | {inf['default_vs_base']:.3f}× "
            f"(FLOPs {inf['default_vs_base_flops']:.4f}×) | — |",
            f"| mixed batch (4 centers) / one adapter | {inf['mixed_vs_single_adapter']:.3f}× | ≤ 1.03× |",
            f"| per-sample set_adapter loop / mixed batch | {inf['mixed_speedup_vs_loop']:.2f}× | ≥ 1.3× |",
        ]
    if seg:
        lines.append(
            f"| SegFormer-b0 key/value prompts / base, inference latency | {seg['kv_vs_base']:.3f}× | ≤ 1.10× |"
        )
    for variant, result in tr.items():
        if variant != "full":
            lines.append(
                f"| {variant} / full fine-tuning, training step peak memory | {result['memory_vs_full']:.3f}× "
                f"(time {result['time_vs_full']:.2f}×) | {'≤ 0.6×' if 'checkpointing' in variant else '—'} |"
            )
    if results.get("3d"):
        r = results["3d"]
        lines += [
            f"| 3D: deep VPT / bare UNETR ({r['config']}, {'x'.join(map(str, r['roi_size']))}, batch 1), inference "
            f"latency | {r['vpt_vs_base']:.3f}× ({r['base_ms']:.0f} ms base) | ≤ 1.05× |",
            f"| 3D: deep VPT / bare UNETR, FLOPs | {r['vpt_vs_base_flops']:.4f}× | — |",
        ]
        for variant, m in r["training"].items():
            if variant != "full":
                time = f", step time {m['time_vs_full']:.2f}×" if m["time_vs_full"] else ""
                target = "≤ 0.6×" if variant.startswith("vpt") and m["gradient_checkpointing"] else "—"
                lines.append(
                    f"| 3D: {variant} / full fine-tuning, training step peak memory | {m['memory_vs_full']:.3f}× "
                    f"({m['peak_mb']:.0f} MB{time}) | {target} |"
                )
    if results.get("latency_curve"):
        lines += [
            "",
            "| image size | prompts | base (ms) | latency keys/values / base | latency token path / base | "
            "FLOPs keys/values / base | FLOPs token path / base |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in results["latency_curve"]:
            lines.append(
                f"| {r['image_size']} | {r['num_virtual_tokens']} | {r['base_ms']:.0f} | "
                f"{r['key_value_vs_base']:.3f}× | {r['token_path_vs_base']:.3f}× | "
                f"{r['key_value_vs_base_flops']:.4f}× | {r['token_path_vs_base_flops']:.4f}× |"
            )
    if results.get("memory_curve") and tr:
        rows = [
            {
                "width": "ViT-S",
                "variant": v,
                "peak_mb": r["peak_mb_above_model"],
                "memory_vs_full": r["memory_vs_full"],
            }
            for v, r in tr.items()
        ] + results["memory_curve"]
        lines += ["", "| backbone | " + " | ".join(TRAIN_VARIANTS) + " |", "|---" * (len(TRAIN_VARIANTS) + 1) + "|"]
        for width in dict.fromkeys(r["width"] for r in rows):
            cells = [next(r for r in rows if r["width"] == width and r["variant"] == v) for v in TRAIN_VARIANTS]
            lines.append(
                f"| {width} | "
                + " | ".join(f"{c['peak_mb']:.0f} MB ({c['memory_vs_full']:.2f}×)" for c in cells)
                + " |"
            )
    if results.get("mixed_curve"):
        lines += [
            "",
            "| centers in batch | mixed (img/s) | per center (img/s) | per sample (img/s) | mixed vs per sample |",
            "|---|---|---|---|---|",
        ]
        for r in results["mixed_curve"]:
            lines.append(
                f"| {r['num_centers']} | {r['mixed_images_per_s']:.1f} | {r['per_center_images_per_s']:.1f} | "
                f"{r['per_sample_images_per_s']:.1f} | {r['mixed_speedup_vs_per_sample']:.2f}× |"
            )
    return "\n".join(lines)


def bench_3d(args) -> dict:
    """Deep VPT vs the bare UNETR (the paper's 3D model): inference latency and FLOPs, training-step peak memory."""
    torch.manual_seed(0)
    base = build_segmentation_model(args.config_3d, num_labels=3).eval()
    pixels = torch.randn(1, volume_in_channels(base), *volume_roi_size(base))
    with torch.inference_mode():
        reference = base(pixels)
    base_flops = count_flops(lambda: base(pixels))
    model = get_peft_model(
        base, peft_medseg.VisualPromptConfig(num_virtual_tokens=args.num_virtual_tokens, prompt_dropout=0.0)
    ).eval()
    vpt_flops = count_flops(lambda: model(pixels))
    times = {}

    def bare():
        with model.disable_adapter():
            model(pixels)

    with torch.inference_mode():
        assert not torch.equal(model(pixels), reference)  # the prompts act
        times = interleaved_fastest({"base": bare, "vpt": lambda: model(pixels)}, args.repeats_3d)
    # Each method as the recipes train it (activation checkpointing for the prompts), and full fine-tuning with
    # checkpointing too, so the saving can be told apart from the checkpointing's.
    variants = {
        "full": ("full", False),
        "full, checkpointing": ("full", True),
        "lora": ("lora", False),
        "vpt-deep": ("vpt-deep", True),
        "vpt-deep-norms": ("vpt-deep-norms", True),
        "vpt-deep-head": ("vpt-deep-head", True),
        "vpt-deep-head, no checkpointing": ("vpt-deep-head", False),
    }
    memory = {
        variant: measure_in_fresh_process(
            training_step_probe,
            base=args.config_3d,
            method=method,
            batch_size=1,
            gradient_checkpointing=checkpointing,
            repeats=args.train_repeats_3d,
        )
        for variant, (method, checkpointing) in tqdm(variants.items(), desc="3D training steps")
    }
    full = memory["full"]
    return {
        "config": args.config_3d,
        "roi_size": list(pixels.shape[2:]),
        "base_ms": 1000 * times["base"],
        "vpt_ms": 1000 * times["vpt"],
        "vpt_vs_base": times["vpt"] / times["base"],
        "vpt_vs_base_flops": vpt_flops / base_flops,
        "training": {
            variant: {
                "peak_mb": r["peak_mb"],
                "memory_vs_full": r["peak_mb"] / full["peak_mb"],
                "step_s": r["step_s"],
                "time_vs_full": r["step_s"] / full["step_s"] if r["step_s"] else None,
                "trainable": r["trainable"],
                "gradient_checkpointing": variants[variant][1],
            }
            for variant, r in memory.items()
        },
    }


SECTIONS = {
    "inference": bench_inference,
    "segformer": bench_segformer,
    "training": bench_training,
    "latency_curve": latency_curve,
    "mixed_curve": mixed_curve,
    "memory_curve": memory_curve,
    "3d": bench_3d,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", help="named base config: small (ViT-S sized) or tiny")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_virtual_tokens", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--curve_repeats", type=int, default=5)
    parser.add_argument("--train_repeats", type=int, default=2)
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=[section for section in SECTIONS if section != "3d"],
        help="what to measure (the curves take minutes on 2 cores)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny config at 64 px, no curves: a smoke run")
    parser.add_argument("--3d", dest="three_d", action="store_true", help="the 3D section alone (MONAI UNETR)")
    parser.add_argument(
        "--config_3d", default="unetr-base", help="3D named config of --3d (ViT-B widths: the paper's)"
    )
    parser.add_argument("--repeats_3d", type=int, default=3)
    parser.add_argument("--train_repeats_3d", type=int, default=1, help="timed 3D training steps per method")
    parser.add_argument("--output_dir", default="outputs/bench")
    args = parser.parse_args()
    if args.three_d:
        args.sections = ["3d"]
    if args.quick:
        args.config, args.image_size, args.repeats, args.train_repeats = "tiny", 64, 5, 1
        args.sections = ["inference", "segformer", "training"]
    device = "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    setup = vars(args) | {"device": device, "threads": torch.get_num_threads()}
    print(f"config={args.config} image_size={args.image_size} batch={args.batch_size} device={device}")
    results = {"setup": setup}
    for section in args.sections:
        results[section] = SECTIONS[section](args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "bench_overhead.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (output_dir / "bench_overhead.md").write_text(table + "\n")
    print(table)
    for path in [
        output_dir / "bench_overhead.json",
        output_dir / "bench_overhead.md",
        *plot_curves(results, output_dir),
    ]:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
