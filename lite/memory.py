"""Honest memory readings: anonymous RSS on the host, allocator peaks on CUDA/MPS.

psutil's RSS counts file-backed mmap pages (safetensors), which the kernel can drop; the memory
a user really pays for is RssAnon. On a CPU-only torch build `torch.cuda.max_memory_allocated()`
silently returns 0, so device readings are only taken from a backend that is really present.
"""

from __future__ import annotations

import bisect
import ctypes
import gc
import resource
import threading
from dataclasses import dataclass
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


def _libc() -> ctypes.CDLL | None:
    """glibc, where there is one (Linux); None elsewhere."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trim_host_heap(collect: bool = True) -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise); `collect` runs the GC first."""
    if collect:
        gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


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


# -- host memory as the kernel counts it: anonymous and file-backed (mapped) pages -------------------------------

MADV_DONTNEED = 4


@dataclass(frozen=True)
class HostMemory:
    """Resident bytes of a process: `anon` (heap, converted weights, activations) + `mapped` (file-backed pages:
    the checkpoint's mapped shards and the shared libraries) = `rss`."""

    rss: int
    anon: int

    @property
    def mapped(self) -> int:
        return self.rss - self.anon


def host_memory(pid: int | str = "self", exact: bool = True) -> HostMemory | None:
    """A process's resident memory; None where /proc has none.

    `exact`: from `/proc/PID/smaps_rollup` (walks the page tables: milliseconds for a mapped checkpoint);
    else from the kernel's running counters in `/proc/PID/status` (RssAnon, RssFile + RssShmem: cheap enough
    to sample all along a run, and within a few pages per thread of the exact count).
    """
    fields: dict[str, int] = {}
    name = "smaps_rollup" if exact else "status"
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Rss", "Anonymous", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    if exact:
        return HostMemory(fields["Rss"], fields.get("Anonymous", 0)) if "Rss" in fields else None
    if "RssAnon" not in fields:
        return None
    return HostMemory(fields["RssAnon"] + fields.get("RssFile", 0) + fields.get("RssShmem", 0), fields["RssAnon"])


class HostPeakSampler:
    """Peaks of RSS, anonymous and mapped memory of a process, sampled every `interval` s in a thread.

    The three peaks are each the largest sample of their own quantity (they need not be simultaneous).
    Use it as a context manager, or `start()` ... `stop()`.
    """

    def __init__(self, pid: int | str = "self", interval: float = 0.01, exact: bool = True) -> None:
        self.pid, self.interval, self.exact = pid, interval, exact
        self.peak_rss = self.peak_anon = self.peak_mapped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        now = host_memory(self.pid, self.exact)
        if now is not None:
            self.peak_rss, self.peak_anon = max(self.peak_rss, now.rss), max(self.peak_anon, now.anon)
            self.peak_mapped = max(self.peak_mapped, now.mapped)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> HostPeakSampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> HostPeakSampler:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self.sample()
        return self

    def __enter__(self) -> HostPeakSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _private_file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's private file mappings none of whose pages was ever written.

    A written page of a private mapping is an anonymous copy (smaps counts it in `Anonymous`): dropping it
    would lose the write, so a mapping holding any is left out whole.
    """
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return []
    out: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for line in text.splitlines():
        head = line.split(maxsplit=5)
        if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            lo, hi = head[0].split("-")
            private_file = len(head) == 6 and head[5].startswith("/") and head[1].endswith("p")
            current = (int(lo, 16), int(hi, 16)) if private_file else None
        elif current is not None and head[0] == "Anonymous:":
            if int(head[1]) == 0:
                out.append(current)
            current = None
    return out


def tensor_span(tensor: torch.Tensor) -> tuple[int, int]:
    """(first byte address, bytes) of a CPU tensor's data."""
    return tensor.data_ptr(), tensor.numel() * tensor.element_size()


def release_file_pages(spans: list[tuple[int, int]]) -> int:
    """Drop the resident pages of `spans` that lie in clean private file mappings (a checkpoint's shards).

    Why: a shard stays mapped while any tensor views it, and every page the loader or a phase touched stays
    counted in the process's RSS, also those of tensors long converted (an int4 LLM read in bf16) or of
    components the current phase does not use. `madvise(MADV_DONTNEED)` drops them; the data stays in the
    file (and the page cache), and a later read faults it back in unchanged. Only whole pages inside a span
    are dropped. Returns the bytes advised (Linux; 0 elsewhere).
    """
    libc = _libc()
    if not libc or not spans:
        return 0
    page = resource.getpagesize()
    mappings = _private_file_mappings()
    starts = [m[0] for m in mappings]
    released = 0
    for address, nbytes in spans:
        lo, hi = -(-address // page) * page, (address + nbytes) // page * page
        i = bisect.bisect_right(starts, lo) - 1
        if hi <= lo or i < 0 or hi > mappings[i][1]:
            continue
        if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED) == 0:
            released += hi - lo
    return released
