"""The CPU plan: every CPU kernel choice of this process, each with its reason, decided once and handed down.

Why: the choices (compute dtype, which Linears run oneDNN-packed, the one-row kernel, the int4 layout, the
threads, OpenMP's wait policy, decode's threads) used to be made where they were used, from caches and global
dicts, and "is bf16 native here" had two answers. Here `decide_plan` makes them all from two inputs, the CPU's
features (`lite/runtime/hardware.py`) and what this torch build answers when asked (`CpuProbes`), so a plan for
any CPU can be built from canned /proc/cpuinfo text (`plan_from_cpuinfo`). "bf16 is native" has one source of
truth: oneDNN's own answer where it was asked (it honours ONEDNN_MAX_CPU_ISA and the real CPU), else the
instruction set; every other choice reads `CpuPlan.native_bf16`.

`PROCESS` is the one process-level holder: the wait policy set before torch starts, and this machine's plan
once it is made (`lite/runtime/cpu/probes.this_machine_plan`). This module imports no torch (the CLI reads it
before torch starts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from lite.runtime.hardware import CpuFeatures, cpu_compute_dtype, detect_from_text, native_bf16

if TYPE_CHECKING:
    import torch

#: Components whose token-wise bf16 Linears run oneDNN-packed where bf16 is native (`lite/runtime/cpu/prepack.py`);
#: the LLM is left alone: its dense layers run on one row at every decode step, where packing gains nothing.
PACKED_COMPONENTS: tuple[str, ...] = ("vision", "yak")
#: How a decode step's threads are chosen (by the decode loop, per call; recorded here with its reason).
DECODE_THREADS_POLICY = ("per call: every thread when idle OpenMP threads sleep (PASSIVE), else the cores other "
                         "processes leave free; the llama.cpp engine, whose barriers spin, always the free cores "
                         "(lite/runtime/decode_threads.py)",
                         "a decode step is a chain of memory-bound matrix-vector products between barriers: a "
                         "spinning thread on a core another process holds makes every barrier wait (2-30x slower on "
                         "a shared 2-core AMD EPYC), a sleeping one yields it; free cores share the bandwidth")


@dataclass(frozen=True)
class Choice:
    """One decision and why it was made."""

    value: str
    reason: str


@dataclass(frozen=True)
class WaitPolicy:
    """OpenMP's wait policy as set before torch started: "PASSIVE" (idle threads sleep), or "default"."""

    value: str
    reason: str


@dataclass(frozen=True)
class CpuProbes:
    """What this torch build answers on this CPU (`lite/runtime/cpu/probes.probe_this_cpu`), or for a canned CPU
    what it is expected to answer (`CpuProbes.expected`)."""

    onednn_bf16: bool | None  # oneDNN runs bf16 GEMMs natively (None: not asked)
    prepack_ops: bool  # this torch has oneDNN's packed-Linear ops
    one_row_kernel: str  # the fastest one-row kernel, measured (`lite/runtime/cpu/row_gemv.py`)
    int4_layout: str  # the layout the CPU int4 kernel packs (`quant/backends/torch_native.cpu_int4_layout`)

    @classmethod
    def expected(cls, features: CpuFeatures) -> "CpuProbes":
        """The answers measured on the CPUs we ran (docs/BENCHMARKS.md): Xeon AMX took oneDNN's mv, AMD Zen 4/5
        ATen's, AVX2-only F.linear; AVX-512 dispatch packs int4 in 64-row lanes, AVX2 in 32-row lanes."""
        kernel = "mv" if features.has("amx_bf16") else "mv-aten" if features.has("avx512_bf16") else "linear"
        layout = ("cpu-avx512" if features.has("avx512f") else "cpu-avx2" if features.has("avx2")
                  else "cpu-pairs16")
        return cls(native_bf16(features), True, kernel, layout)


@dataclass(frozen=True)
class CpuPlan:
    """The CPU kernels this process runs, each with its reason (shown at load, in --json and /health)."""

    cpu: str
    native_bf16: bool
    compute: Choice  # "bf16" or "fp32": the dtype auto-dtype runs compute in
    packed: Choice  # which Linears are oneDNN-packed
    packed_components: tuple[str, ...]
    one_row_kernel: Choice
    int4_layout: Choice
    threads: Choice
    wait_policy: Choice
    decode_threads: Choice

    @property
    def compute_dtype(self) -> "torch.dtype":
        import torch  # kept off the start-up path: this module is read before torch starts

        return torch.bfloat16 if self.compute.value == "bf16" else torch.float32

    def to_dict(self, packed_layers: int | None = None) -> dict[str, Any]:
        """The plan as JSON (`cpu_plan` in --json and /health); `packed_layers`: how many the load packed."""
        out = asdict(self)
        out["packed_components"] = list(self.packed_components)
        if packed_layers is not None:
            out["packed_layers"] = packed_layers
        return out

    def describe(self, packed_layers: int | None = None) -> list[str]:
        """A short block for the load report (llama.cpp style): the CPU, the choices, and why compute and OpenMP
        are what they are here (every reason is in `to_dict`)."""
        packed = ("none" if not self.packed_components else
                  f"{'token-wise' if packed_layers is None else packed_layers} ({', '.join(self.packed_components)})")
        return [f"cpu plan: {self.cpu}",
                f"  compute {self.compute.value}, packed Linears {packed}, one-row kernel {self.one_row_kernel.value}, "
                f"int4 layout {self.int4_layout.value}, threads {self.threads.value}, OpenMP wait "
                f"{self.wait_policy.value}, decode threads {self.decode_threads.value.split(':')[0]}",
                f"  because: {self.compute.reason}; {self.wait_policy.reason}"]


class ProcessCpu:
    """The one process-level holder of CPU decisions (see module doc)."""

    def __init__(self) -> None:
        self.wait: WaitPolicy | None = None
        self.threads_reason: str | None = None  # how `configure_threads` set the threads (None: it did not run)
        self.plan: CpuPlan | None = None


PROCESS = ProcessCpu()

_KERNEL_REASONS = {
    "linear": "F.linear: no matrix-vector kernel measured clearly faster here",
    "mv": "oneDNN's torch.mv measured fastest for one row here (Xeon AMX: the head 52 -> 35 ms)",
    "mv-aten": "ATen's matrix-vector kernel measured fastest for one row here (AMD Zen 4: the head 45 -> 25 ms)",
}


def _packed(native: bool, probes: CpuProbes) -> tuple[Choice, tuple[str, ...]]:
    if not native:
        return Choice("none", "no native bf16 GEMM: bf16 Linears compute in fp32, nothing to pack"), ()
    if not probes.prepack_ops:
        return Choice("none", "this torch lacks oneDNN's packed-Linear ops"), ()
    return (Choice(f"token-wise bf16 Linears of {', '.join(PACKED_COMPONENTS)}",
                   "oneDNN reorders a bf16 weight on every call unless it is packed once (quick Yak pass 1.17x, "
                   "Xeon AMX); one-row layers, the LLM and weights mapped from the checkpoint stay plain"),
            PACKED_COMPONENTS)


def decide_plan(features: CpuFeatures, probes: CpuProbes, threads: int, threads_reason: str,
                wait: WaitPolicy | None) -> CpuPlan:
    """Every CPU choice from the features, the probes' answers, the thread count and the wait policy."""
    native = native_bf16(features, probes.onednn_bf16)
    compute_dtype, compute_reason = cpu_compute_dtype(features, probes.onednn_bf16)
    compute = "bf16" if str(compute_dtype).endswith("bfloat16") else "fp32"
    packed, components = _packed(native, probes)
    kernel = Choice(probes.one_row_kernel, _KERNEL_REASONS.get(probes.one_row_kernel, "measured fastest here"))
    layout = Choice(probes.int4_layout, "the layout this torch's CPU int4 kernel packs for the instruction set "
                                        "ATen dispatches (found by packing a probe); payloads in another are converted")
    wait_choice = (Choice(wait.value, wait.reason) if wait is not None else
                   Choice("default", "OpenMP's default (spin briefly, then sleep): not set before torch started"))
    return CpuPlan(features.describe(), native, Choice(compute, compute_reason), packed, components, kernel, layout,
                   Choice(str(threads), threads_reason), wait_choice, Choice(*DECODE_THREADS_POLICY))


def plan_from_cpuinfo(text: str, probes: CpuProbes | None = None, threads: int = 2, capability: str = "AVX512",
                      onednn_max_isa: str | None = None, wait: WaitPolicy | None = None) -> CpuPlan:
    """The plan for the CPU a /proc/cpuinfo text describes, probing nothing here (the probes' expected answers
    unless given)."""
    features = detect_from_text(text, capability, onednn_max_isa, threads)
    return decide_plan(features, probes or CpuProbes.expected(features), threads,
                       f"{threads} intra-op (physical cores), 1 inter-op", wait)


__all__ = ["DECODE_THREADS_POLICY", "PACKED_COMPONENTS", "PROCESS", "Choice", "CpuPlan", "CpuProbes", "ProcessCpu",
           "WaitPolicy", "decide_plan", "plan_from_cpuinfo"]
