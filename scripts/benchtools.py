"""Timing shared by the benchmark scripts: device-synchronised wall-clock samples."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued accelerator work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int, warmup: bool = True) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`, after one untimed warm-up call."""
    if warmup:
        fn()
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out
