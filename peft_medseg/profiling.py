"""Peak memory of a piece of work on CPU or GPU, for benchmarks that report ratios between methods."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import torch


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
