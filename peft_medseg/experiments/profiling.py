"""Cost probes for benchmarks that report ratios between methods: peak memory of a piece of work on CPU or GPU, a
training step of a method, and running a probe in a fresh process.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..data import processor_target_size
from ..models import build_segmentation_model
from ..models3d import is_volume_model, volume_in_channels, volume_num_labels, volume_roi_size
from ..scoring import segmentation_logits
from ..storage import load_base
from ..training import enable_gradient_checkpointing, prepare_model, segmentation_loss, set_train_mode


def _resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_mb(work: Callable[[], object]) -> float:
    """Growth of memory (MB) during `work()` at its peak, above what was in use when it started.

    On CUDA: the allocator's peak. On CPU: the process's resident memory, sampled every half millisecond by a
    thread (torch releases the GIL inside its kernels), since the kernel's high-water mark (`ru_maxrss`) is often
    set by loading libraries and never moves for small models. Compare methods measured the same way, as ratios.
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        work()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    start = _resident_mb()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _resident_mb())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _resident_mb()) - start


def measure_in_fresh_process(probe: Callable[..., dict], **kwargs) -> dict:
    """`probe(**kwargs)` run in a fresh Python process, its JSON result returned.

    Memory figures are only comparable between methods when each is measured in a process of its own: an allocator
    that already grew for one method hides the next one's peak. `probe` must be a module-level function.
    """
    code = (
        "import importlib, json, sys; "
        "probe = getattr(importlib.import_module(sys.argv[1]), sys.argv[2]); "
        "print(json.dumps(probe(**json.loads(sys.argv[3]))))"
    )
    command = [sys.executable, "-c", code, probe.__module__, probe.__name__, json.dumps(kwargs)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{probe.__name__}({kwargs}) failed in a fresh process:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def training_step_probe(
    base: str | dict,
    method: str,
    batch_size: int,
    image_size: int = 224,
    num_labels: int = 4,
    num_virtual_tokens: int | None = None,
    gradient_checkpointing: bool = False,
    repeats: int = 0,
) -> dict:
    """Peak memory growth (MB) of a first training step of `method`, and the median time of `repeats` more.

    `base` is a saved base folder (its own image size and labels), a named config (`"small"`, or a 3D one such as
    `"unetr-base"`, which takes patches of its own size) or a spec of the keys of `NAMED_CONFIGS` (random init, e.g.
    ViT-B widths). The first step allocates everything a step needs
    (activations, gradients, optimizer state); later steps reuse the allocator's cache, so only it shows the peak.
    """
    if isinstance(base, str) and Path(base).is_dir():
        model, processor = load_base(base)
        if not is_volume_model(model):
            image_size, num_labels = processor_target_size(processor)[0], model.config.num_labels
        else:
            num_labels = volume_num_labels(model)
    else:
        torch.manual_seed(0)
        model = build_segmentation_model(base, num_labels, image_size=image_size)
    # A 3D base (MONAI) takes patches of its own size and channel count; a 2D base RGB images.
    volume = is_volume_model(model)
    input_shape = (volume_in_channels(model), *volume_roi_size(model)) if volume else (3, image_size, image_size)
    model = prepare_model(model, method, num_virtual_tokens=num_virtual_tokens, prompt_dropout=0.0)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    set_train_mode(model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    pixels = torch.randn(batch_size, *input_shape)
    labels = torch.randint(0, num_labels, (batch_size, *input_shape[1:]))

    def step() -> None:
        segmentation_loss(segmentation_logits(model, pixels), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    peak = peak_memory_mb(step)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return {
        "peak_mb": peak,
        "step_s": statistics.median(times) if times else None,
        "trainable": sum(p.numel() for p in parameters),
    }
