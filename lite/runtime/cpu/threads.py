"""Threads and OpenMP's wait policy: set once per process, the wait policy before torch is imported.

Why: OpenMP reads its variables once, at start-up, so `early_environment()` runs before `import torch` (this
module imports no torch) and records what it chose in the one process holder (`lite/runtime/cpu/plan.PROCESS`),
where the CPU plan reads it. Intra-op threads default to physical cores, inter-op threads to 1.
"""

from __future__ import annotations

import os
from typing import Mapping

from lite.runtime.cpu.plan import PROCESS, WaitPolicy
from lite.runtime.hardware import physical_cores

#: CPU pressure (Linux PSI "some avg10": percent of the last 10 s in which a runnable task waited for a
#: CPU) from which the cores count as shared with other busy processes.
SHARED_CPU_PRESSURE = 5.0


def cpu_contention(pressure_path: str = "/proc/pressure/cpu") -> tuple[bool, str]:
    """Whether other processes keep this machine's CPUs busy now, and the reading it was decided from.

    Linux's pressure stall information when the kernel has it; otherwise the 1-minute load average
    (our own process has not run yet), shared from half a load per CPU."""
    try:
        with open(pressure_path, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("some "):
                    avg10 = float(dict(kv.split("=", 1) for kv in line.split()[1:])["avg10"])
                    return avg10 >= SHARED_CPU_PRESSURE, f"CPU pressure {avg10:.1f}% over 10 s"
    except (OSError, ValueError, KeyError):
        pass
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return False, "no CPU load reading"
    cpus = os.cpu_count() or 1
    return load >= 0.5 * cpus, f"load average {load:.2f} on {cpus} CPUs"


def wait_policy(environ: Mapping[str, str], contention: tuple[bool, str] | None = None) -> WaitPolicy:
    """OpenMP's wait policy for this process, from the environment or how busy the CPUs are now.

    2-core Xeon AMX, docs/BENCHMARKS.md: on idle cores the default (spin briefly, then sleep) ran the ViT
    1.6-1.9x faster than PASSIVE; with another process on a core, PASSIVE ran it 1.3-1.5x faster."""
    if "OMP_WAIT_POLICY" in environ:
        return WaitPolicy(environ["OMP_WAIT_POLICY"], "set by the environment")
    shared, reading = cpu_contention() if contention is None else contention
    if shared:
        return WaitPolicy("PASSIVE", f"idle OpenMP threads sleep: the CPUs are shared ({reading})")
    return WaitPolicy("default", f"idle OpenMP threads spin briefly: the CPUs are idle ({reading})")


def early_environment(environ: Mapping[str, str] | None = None,
                      contention: tuple[bool, str] | None = None) -> dict[str, str]:
    """Variables to set before torch is imported (OpenMP reads them once, at start-up): the wait policy (see
    `wait_policy`, recorded for the CPU plan) and no second pool from HF tokenizers. What the user has set is
    left alone. Apply with `os.environ.update(early_environment())`."""
    env = os.environ if environ is None else environ
    policy = wait_policy(env, contention)
    PROCESS.wait = policy
    wanted = {"TOKENIZERS_PARALLELISM": "false"}
    if policy.value == "PASSIVE":
        wanted["OMP_WAIT_POLICY"] = "PASSIVE"
    return {k: v for k, v in wanted.items() if k not in env}


def configure_threads(n: int | None = None) -> int:
    """Intra-op threads = n (default: physical cores), inter-op threads = 1; returns the intra-op count.

    Inter-op threads can only be set before the first parallel work and only once per process; if
    that moment has passed, the existing pool is kept (it only matters for torch.jit forks).
    """
    import torch  # kept off the start-up path: this module runs before torch is imported

    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    threads = n or physical_cores()
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # parallel work already started, or set before: the pool stays as it is
        pass
    PROCESS.threads_reason = (f"{threads} intra-op ({'--threads' if n else 'physical cores'}), "
                              f"{torch.get_num_interop_threads()} inter-op")
    return threads


__all__ = ["SHARED_CPU_PRESSURE", "configure_threads", "cpu_contention", "early_environment", "wait_policy"]
