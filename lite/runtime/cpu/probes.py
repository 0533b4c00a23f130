"""This machine's CPU plan: the probes asked once, then `decide_plan`, kept in the one process holder.

Why: the probes (oneDNN's bf16 answer, the packed-Linear ops, the one-row kernel race, the int4 kernel's layout)
cost ~0.1-0.3 s in all and their answers do not change within a process, so they run once, on the first CPU load,
with the threads that load runs with.
"""

from __future__ import annotations

import torch

from lite.runtime.cpu.plan import PROCESS, CpuPlan, CpuProbes, decide_plan
from lite.runtime.cpu.prepack import prepack_ops_available
from lite.runtime.cpu.row_gemv import measure_one_row_kernel
from lite.runtime.hardware import detect
from quant.backends.int4_prefill import dense_gemm_is_native
from quant.backends.torch_native import cpu_int4_layout


def probe_this_cpu() -> CpuProbes:
    """Ask this torch build on this CPU (oneDNN's bf16 support, its ops, a one-row race, the int4 layout)."""
    return CpuProbes(dense_gemm_is_native(torch.bfloat16), prepack_ops_available(),
                     measure_one_row_kernel(torch.bfloat16), cpu_int4_layout())


def this_machine_plan() -> CpuPlan:
    """The plan of this process: made on first use from `detect()` and `probe_this_cpu()`, then the same value."""
    if PROCESS.plan is None:
        threads = torch.get_num_threads()
        reason = PROCESS.threads_reason or f"{threads} intra-op (torch's default), {torch.get_num_interop_threads()} inter-op"
        PROCESS.plan = decide_plan(detect(), probe_this_cpu(), threads, reason, PROCESS.wait)
    return PROCESS.plan


__all__ = ["probe_this_cpu", "this_machine_plan"]
