"""Honest memory readings: anonymous RSS on the host, allocator peaks on CUDA/MPS.

psutil's RSS counts file-backed mmap pages (safetensors), which the kernel can drop; the memory
a user really pays for is RssAnon. On a CPU-only torch build `torch.cuda.max_memory_allocated()`
silently returns 0, so device readings are only taken from a backend that is really present.
"""

from __future__ import annotations

import ctypes
import gc
import resource
from pathlib import Path

import torch


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


_LIBC: ctypes.CDLL | None | bool = None


def trim_host_heap(collect: bool = True) -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise); `collect` runs the GC first."""
    global _LIBC
    if collect:
        gc.collect()
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        if _LIBC:
            _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        _LIBC = False


def rss_anon_bytes() -> int:
    """Anonymous resident memory of this process (Linux); falls back to maxrss elsewhere."""
    kib = _status_kib("RssAnon")
    if kib is not None:
        return kib * 1024
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set (VmHWM on Linux; ru_maxrss elsewhere, in bytes)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if peak > 1 << 32 else peak * 1024  # macOS reports bytes, Linux KiB


def reset_device_peak(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def device_peak_bytes(device: torch.device) -> int | None:
    """Peak allocator bytes on an accelerator, or None where there is none to ask."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "mps" and torch.backends.mps.is_available():
        return int(torch.mps.driver_allocated_memory())
    return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
