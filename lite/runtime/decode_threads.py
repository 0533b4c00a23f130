"""How many threads a CPU decode step gets, decided per call from what the cores are doing now and from how
this process's OpenMP threads wait.

A decode step is a chain of memory-bound matrix-vector products separated by OpenMP barriers. When every
allowed core is free, all of them share the bandwidth and the step is fastest. When other processes keep cores
busy, what is best depends on the wait policy OpenMP read at start-up (`lite/runtime/cpu/threads.py`):

- default (idle threads spin before they sleep): a thread that waits at a barrier spins away the time slice
  that its descheduled partner needs, so with cores taken only the free ones get a thread (the number of
  cores other processes leave free, read from `/proc/stat` over a window that ends now: the busy time of the
  allowed cores minus this process's own CPU time, `CoreWindow`). Measured on the 2-core Zen 5 with a busy
  process: 2 threads 0.17 tok/s, 1 thread 1.17 tok/s.
- PASSIVE (idle threads sleep at once): a waiting thread costs nothing, and the fair scheduler gives a process
  a share per runnable thread, so every thread is kept: with one and with two busy processes, 2 threads ran
  1.27x and 1.56x faster than 1 (docs/BENCHMARKS.md, "Decode threads, quiet and loaded").

The window is the prompt's prefill (seconds, no extra wait), topped up by a short sleep when it was shorter.
`scripts/bench_decode_threads.py` measures the choice against pinned counts without and with added load.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from lite.runtime.cpu.plan import PROCESS

MIN_WINDOW_S = 0.1  # a window shorter than this is topped up by sleeping (the clock ticks at 100 Hz)
FREE_SHARE = 0.7  # a core counts as free when others used at most 30% of it over the window
#: Pins the decode threads (1..the run's threads) instead of reading the cores. The thread count can change a
#: reduction's rounding, so a greedy answer whose top logits nearly tie can differ between 1 and 2 threads:
#: reproducible runs (the test suite, bitwise comparisons) pin it.
PIN_ENV = "OVIS_LITE_DECODE_THREADS"


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def read_busy_ticks(cpus: set[int], path: str = "/proc/stat") -> int | None:
    """Non-idle clock ticks of `cpus` since boot (user+nice+system+irq+softirq+steal), None off Linux."""
    try:
        with open(path, encoding="ascii") as fh:
            lines = fh.readlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
        total += user + nice + system + irq + softirq + steal
    return total


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class CoreWindow:
    """A reading of the allowed cores' busy ticks and this process's CPU time; `free_cores` compares it
    with now."""

    cpus: set[int]
    busy_ticks: int | None
    own_seconds: float
    wall: float

    @classmethod
    def start(cls) -> CoreWindow:
        cpus = _allowed_cpus()
        return cls(cpus, read_busy_ticks(cpus), _own_cpu_seconds(), time.perf_counter())

    def others_busy_cores(self) -> float | None:
        """Cores' worth of CPU time other processes used since `start` (None where it cannot be read)."""
        if self.busy_ticks is None:
            return None
        elapsed = time.perf_counter() - self.wall
        if elapsed < MIN_WINDOW_S:
            time.sleep(MIN_WINDOW_S - elapsed)
            elapsed = time.perf_counter() - self.wall
        busy = read_busy_ticks(self.cpus)
        if busy is None:
            return None
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        others = (busy - self.busy_ticks) / hz - (_own_cpu_seconds() - self.own_seconds)
        return max(others, 0.0) / elapsed

    def decode_threads(self, limit: int, spinning: bool = False) -> tuple[int, str]:
        """Threads for the decode that follows (1..`limit`) and the reading it was decided from. `spinning`: the
        decode's threads spin at their barriers whatever OpenMP's policy (llama.cpp's thread pool)."""
        pinned = pinned_threads(limit)
        if pinned is not None:
            return pinned, f"pinned by ${PIN_ENV}: {pinned} decode thread(s)"
        if waits_passively() and not spinning:
            return limit, f"idle OpenMP threads sleep (PASSIVE): all {limit} decode thread(s), loaded or not"
        others = self.others_busy_cores()
        if others is None:
            return limit, "no core reading: all threads"
        threads = choose_threads(len(self.cpus), others, limit)
        return threads, f"others used {others:.2f} of {len(self.cpus)} cores: {threads} decode thread(s)"


def waits_passively() -> bool:
    """Whether this process's idle OpenMP threads sleep at once: the policy recorded before torch started
    (`lite.runtime.cpu.threads.early_environment`), else `$OMP_WAIT_POLICY` as it is now."""
    policy = PROCESS.wait.value if PROCESS.wait is not None else os.environ.get("OMP_WAIT_POLICY", "")
    return policy.strip().upper() == "PASSIVE"


def pinned_threads(limit: int) -> int | None:
    """The decode threads `$OVIS_LITE_DECODE_THREADS` pins, within 1..`limit`; None when it is unset or not a
    whole number."""
    text = os.environ.get(PIN_ENV, "").strip()
    return max(1, min(limit, int(text))) if text.isdigit() else None


def choose_threads(cores: int, others_busy: float, limit: int) -> int:
    """One thread per core that others leave at least `FREE_SHARE` free, within 1..`limit`."""
    return max(1, min(limit, int(cores - others_busy + (1 - FREE_SHARE))))
