"""Overhead of visual prompts, as ratios measured within one run (machines are noisy; ratios are not).

    python recipes/bench_overhead.py                 # ViT-S-sized UperNet, 224 px, batch 8, CPU
    python recipes/bench_overhead.py --quick         # a small config, for a smoke run

Measures: inference latency of deep VPT vs the bare base; a mixed batch over 4 centers vs the same batch under one
adapter and vs a per-sample loop with `set_adapter`; time and peak memory of one VPT training step vs one full
fine-tuning step (peak resident memory, each step in its own process). Writes a JSON and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import SegformerConfig, SegformerForSemanticSegmentation

import peft_medseg
from peft_medseg.models import build_segmentation_model
from peft_medseg.profiling import peak_memory_mb


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median time of each function, measured round-robin so that drift in machine load hits all of them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def build(config_name: str, image_size: int):
    torch.manual_seed(0)
    return build_segmentation_model(config_name, num_labels=4, image_size=image_size).eval()


def four_centers(base, args, **config):
    """A copy of `base` with four centers' adapters (the first active), and a batch's worth of mixed center names."""
    centers = [f"center-{i}" for i in range(4)]
    config = dict(num_virtual_tokens=args.num_virtual_tokens, **config)
    model = get_peft_model(copy.deepcopy(base), peft_medseg.VisualPromptConfig(**config), adapter_name=centers[0])
    for name in centers[1:]:
        model.add_adapter(name, peft_medseg.VisualPromptConfig(**config))
    model.set_adapter(centers[0])
    return model.eval(), centers, [centers[i % 4] for i in range(args.batch_size)]


def bench_inference(args) -> dict:
    base = build(args.config, args.image_size)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    model, centers, mixed_names = four_centers(base, args, deep=True)

    def per_sample_loop():
        for i, name in enumerate(mixed_names):
            model.set_adapter(name)
            model(pixel_values=x[i : i + 1])
        model.set_adapter(centers[0])

    with torch.inference_mode():
        t = interleaved_medians(
            {
                "base": lambda: base(pixel_values=x),
                "vpt": lambda: model(pixel_values=x),
                "mixed": lambda: model(pixel_values=x, adapter_names=mixed_names),
                "loop": per_sample_loop,
            },
            args.repeats,
        )
    return {
        "base_ms": 1000 * t["base"],
        "vpt_deep_ms": 1000 * t["vpt"],
        "mixed_4_centers_ms": 1000 * t["mixed"],
        "per_sample_loop_ms": 1000 * t["loop"],
        "vpt_vs_base": t["vpt"] / t["base"],
        "mixed_vs_single_adapter": t["mixed"] / t["vpt"],
        "mixed_speedup_vs_loop": t["loop"] / t["mixed"],
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
        t = interleaved_medians(
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


def train_step_in_this_process(method: str, args) -> dict:
    """Peak memory growth and time of a training step, in a fresh process so methods do not share an allocator."""
    model = build(args.config, args.image_size)
    if method == "vpt":
        model = get_peft_model(model, peft_medseg.VisualPromptConfig(num_virtual_tokens=args.num_virtual_tokens))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 4, (args.batch_size, args.image_size, args.image_size))

    def step():
        logits = model(pixel_values=x).logits
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # The first step allocates everything a training step needs (activations, gradients, optimizer state); later
    # steps reuse the allocator's cache, so only the first one shows the method's peak.
    peak = peak_memory_mb(step)
    seconds = median_seconds(step, repeats=args.train_repeats, warmup=1)
    trainable = sum(p.numel() for p in params)
    return {"step_s": seconds, "peak_mb_above_model": peak, "trainable": trainable}


def bench_training(args) -> dict:
    results = {}
    for method in ("full", "vpt"):
        command = [sys.executable, __file__, "--_train_step", method, *sys.argv[1:]]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[method] = json.loads(output.strip().splitlines()[-1])
    return {
        "full_step_s": results["full"]["step_s"],
        "vpt_step_s": results["vpt"]["step_s"],
        "full_peak_mb": results["full"]["peak_mb_above_model"],
        "vpt_peak_mb": results["vpt"]["peak_mb_above_model"],
        "vpt_vs_full_time": results["vpt"]["step_s"] / results["full"]["step_s"],
        "vpt_vs_full_memory": results["vpt"]["peak_mb_above_model"] / results["full"]["peak_mb_above_model"],
        "trainable_vpt": results["vpt"]["trainable"],
        "trainable_full": results["full"]["trainable"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", help="named base config: small (ViT-S sized) or tiny")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_virtual_tokens", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--train_repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny config at 64 px: a smoke run in seconds")
    parser.add_argument("--output", default="outputs/bench_overhead.json")
    parser.add_argument("--_train_step", choices=["full", "vpt"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.config, args.image_size, args.repeats, args.train_repeats = "tiny", 64, 5, 2
    torch.set_num_threads(torch.get_num_threads())
    if args._train_step:
        print(json.dumps(train_step_in_this_process(args._train_step, args)))
        return

    device = "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    print(
        f"config={args.config} image_size={args.image_size} batch={args.batch_size} "
        f"tokens={args.num_virtual_tokens} device={device} threads={torch.get_num_threads()}"
    )
    results = {"setup": vars(args) | {"device": device}, "inference": bench_inference(args)}
    results["segformer"] = bench_segformer(args)
    results["training"] = bench_training(args)
    inf, tr, seg = results["inference"], results["training"], results["segformer"]
    print("| measure | value | target |\n|---|---|---|")
    print(
        f"| deep VPT ({args.num_virtual_tokens} tokens) / base, inference latency | {inf['vpt_vs_base']:.3f}× | ≤ 1.10× |"
    )
    print(f"| mixed batch (4 centers) / one adapter | {inf['mixed_vs_single_adapter']:.3f}× | ≤ 1.05× |")
    print(f"| per-sample set_adapter loop / mixed batch | {inf['mixed_speedup_vs_loop']:.2f}× faster | — |")
    print(f"| SegFormer-b0 key/value prompts / base, inference latency | {seg['kv_vs_base']:.3f}× | ≤ 1.10× |")
    print(f"| VPT / full fine-tuning, training step time | {tr['vpt_vs_full_time']:.3f}× | — |")
    print(f"| VPT / full fine-tuning, training peak memory | {tr['vpt_vs_full_memory']:.3f}× | ≤ 0.7× |")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
