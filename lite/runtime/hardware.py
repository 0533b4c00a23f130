"""What this CPU can do fast, and how many threads to give it: the facts the CPU path is chosen from.

Why: bf16 GEMMs are native only on some CPUs (AMX, AVX512-BF16, ARM bf16); elsewhere torch emulates
them ~10-90x slower than fp32, so the compute dtype is picked per instruction set. The instruction set
that counts is the one torch really dispatches: `ATEN_CPU_CAPABILITY` and `ONEDNN_MAX_CPU_ISA` can
lower it below what /proc/cpuinfo lists, and are honoured here.

Threads and OpenMP's wait policy are set in `lite/runtime/cpu/threads.py`; a decode step's threads are chosen per
call from the current load (`lite/runtime/decode_threads.py`); the CPU plan records all of it
(`lite/runtime/cpu/plan.py`).
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping

import psutil

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that use it: `early_environment()` must run before torch is
# imported (OpenMP reads its variables once), so importing this module must not import torch.

X86_FEATURES: tuple[str, ...] = ("amx_bf16", "avx512_bf16", "avx512_vnni", "avx512f", "avx2", "fma")
ARM_FEATURES: tuple[str, ...] = ("neon", "bf16", "i8mm", "dotprod")
#: /proc/cpuinfo "Features" words (aarch64) -> our names
_ARM_WORDS: dict[str, str] = {"asimd": "neon", "bf16": "bf16", "i8mm": "i8mm", "asimddp": "dotprod"}
#: macOS sysctl keys -> our names (first key found wins)
_MAC_KEYS: dict[str, tuple[str, ...]] = {
    "neon": ("hw.optional.AdvSIMD", "hw.optional.neon"),
    "bf16": ("hw.optional.arm.FEAT_BF16",),
    "i8mm": ("hw.optional.arm.FEAT_I8MM",),
    "dotprod": ("hw.optional.arm.FEAT_DotProd",),
}
#: oneDNN's ISA ladder (ONEDNN_MAX_CPU_ISA), lowest first, and the x86 features each level allows
_ONEDNN_LADDER: tuple[tuple[str, frozenset[str]], ...] = (
    ("SSE41", frozenset()),
    ("AVX", frozenset()),
    ("AVX2", frozenset({"avx2", "fma"})),
    ("AVX2_VNNI", frozenset({"avx2", "fma"})),
    ("AVX2_VNNI_2", frozenset({"avx2", "fma"})),
    ("AVX512_CORE", frozenset({"avx2", "fma", "avx512f"})),
    ("AVX512_CORE_VNNI", frozenset({"avx2", "fma", "avx512f", "avx512_vnni"})),
    ("AVX512_CORE_BF16", frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"})),
    ("AVX10_1_512", frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"})),
    ("AVX512_CORE_FP16", frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"})),
    ("AVX10_1_512_AMX", frozenset(X86_FEATURES)),
    ("AVX512_CORE_AMX", frozenset(X86_FEATURES)),
    ("AVX10_1_512_AMX_FP16", frozenset(X86_FEATURES)),
    ("AVX512_CORE_AMX_FP16", frozenset(X86_FEATURES)),
    ("ALL", frozenset(X86_FEATURES)),
)
#: ATen's dispatch capability -> the x86 features its kernels may use
_ATEN_CAPS: dict[str, frozenset[str]] = {
    "DEFAULT": frozenset(), "AVX2": frozenset({"avx2", "fma"}), "AVX512": frozenset(X86_FEATURES),
}


@dataclass(frozen=True)
class CpuFeatures:
    """The instruction-set facts one CPU offers, after the caps torch runs under."""

    arch: str  # "x86_64", "aarch64", "arm64", ...
    model: str
    features: tuple[str, ...]  # usable (listed by the CPU and allowed by the caps), in X86/ARM_FEATURES order
    listed: tuple[str, ...] = ()  # what the CPU itself reports, before caps
    capability: str = ""  # torch.backends.cpu.get_cpu_capability()
    physical_cores: int = 1
    logical_cores: int = 1
    bandwidth_gbs: float | None = None  # measured copy bandwidth, bytes read + written per second / 1e9
    notes: tuple[str, ...] = field(default=())

    def has(self, feature: str) -> bool:
        return feature in self.features

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["features"], out["listed"], out["notes"] = list(self.features), list(self.listed), list(self.notes)
        out["native_bf16"] = native_bf16(self)
        return out

    def describe(self) -> str:
        """One line for the load report, e.g. 'AMD EPYC (x86_64): avx2 fma; 2 cores; 15.8 GB/s'."""
        parts = [f"{self.model} ({self.arch}): {' '.join(self.features) or 'no SIMD extensions we use'}"]
        if self.capability:
            parts.append(f"torch kernels {self.capability}")
        parts.append(f"{self.physical_cores} core{'s' if self.physical_cores != 1 else ''}")
        if self.bandwidth_gbs is not None:
            parts.append(f"{self.bandwidth_gbs:.1f} GB/s copy")
        return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# parsing (pure functions of text, so they are tested on canned inputs)
# ---------------------------------------------------------------------------------------------

def parse_cpuinfo(text: str) -> tuple[str, set[str], set[str]]:
    """(model, x86 flags, arm features) from a Linux /proc/cpuinfo text (first processor block)."""
    model = ""
    x86: set[str] = set()
    arm: set[str] = set()
    implementer = part = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "model name" and not model:
            model = value
        elif key == "flags" and not x86:
            x86 = set(value.split())
        elif key == "features" and not arm:
            arm = {_ARM_WORDS[w] for w in value.split() if w in _ARM_WORDS}
        elif key == "cpu implementer" and not implementer:
            implementer = value
        elif key == "cpu part" and not part:
            part = value
        elif key == "hardware" and not model:
            model = value
    if not model and implementer:
        model = f"ARM CPU (implementer {implementer}, part {part or '?'})"
    return model, {f for f in X86_FEATURES if f in x86}, arm


def parse_sysctl(values: Mapping[str, str]) -> set[str]:
    """ARM features from macOS `sysctl hw.optional.*` key -> value ("1" = present)."""
    found = set()
    for feat, keys in _MAC_KEYS.items():
        for k in keys:
            if k in values:
                if values[k].strip() == "1":
                    found.add(feat)
                break
    return found


def allowed_x86(capability: str, onednn_max_isa: str | None) -> frozenset[str]:
    """x86 features torch may really use under its dispatch capability and oneDNN's ISA cap.

    bf16/AMX GEMMs run in oneDNN and vectorised elementwise kernels in ATen: a feature counts when
    both allow it (a lowered ATEN_CPU_CAPABILITY also lowers how fast the fp32 fallback casts run).
    """
    aten = _ATEN_CAPS.get(capability.upper(), frozenset(X86_FEATURES))
    if not onednn_max_isa:
        return aten
    names = [n for n, _ in _ONEDNN_LADDER]
    level = onednn_max_isa.strip().upper()
    onednn = dict(_ONEDNN_LADDER).get(level, frozenset(X86_FEATURES) if level not in names else frozenset())
    return aten & onednn


def order(found: set[str], arch: str) -> tuple[str, ...]:
    ref = ARM_FEATURES if is_arm(arch) else X86_FEATURES
    return tuple(f for f in ref if f in found)


def is_arm(arch: str) -> bool:
    return arch.lower() in ("aarch64", "arm64", "armv8", "armv8l") or arch.lower().startswith("arm")


def features_from(arch: str, model: str, listed: set[str], capability: str, onednn_max_isa: str | None,
                  physical: int, logical: int) -> CpuFeatures:
    """Combine what the CPU lists with what torch is allowed to use."""
    notes: list[str] = []
    usable = set(listed)
    if not is_arm(arch):
        usable &= allowed_x86(capability, onednn_max_isa)
        capped = sorted(set(listed) - usable)
        if capped:
            notes.append(f"not used by torch here (ATEN_CPU_CAPABILITY/ONEDNN_MAX_CPU_ISA): {' '.join(capped)}")
    return CpuFeatures(arch, model or platform.processor() or arch, order(usable, arch), order(set(listed), arch),
                       capability, max(1, physical), max(1, logical), None, tuple(notes))


# ---------------------------------------------------------------------------------------------
# this machine
# ---------------------------------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def _sysctl(keys: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in keys:
        try:
            res = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=2, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        if res.returncode == 0 and res.stdout.strip():
            out[key] = res.stdout.strip()
    return out


def physical_cores() -> int:
    """Physical cores this process may run on (psutil, then os.cpu_count; capped by the affinity mask)."""
    n: int | None = None
    try:
        n = psutil.cpu_count(logical=False)
    except Exception:  # psutil unable to read the topology
        n = None
    n = n or os.cpu_count() or 1
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        try:
            n = min(n, len(affinity(0)))
        except OSError:
            pass
    return max(1, n)


def detect() -> CpuFeatures:
    """This CPU's features (bandwidth is measured separately by `memory_bandwidth`); the CPU plan reads it once."""
    import torch  # waits: early_environment() runs before torch (the module's note)

    arch = platform.machine() or "unknown"
    capability = torch.backends.cpu.get_cpu_capability()
    logical = os.cpu_count() or 1
    model, x86, arm = parse_cpuinfo(_read("/proc/cpuinfo"))
    if platform.system() == "Darwin":
        keys = tuple(k for ks in _MAC_KEYS.values() for k in ks) + ("machdep.cpu.brand_string",)
        values = _sysctl(keys)
        model = values.get("machdep.cpu.brand_string", model)
        arm = parse_sysctl(values) if is_arm(arch) else arm
    listed = arm if is_arm(arch) else x86
    if not listed and not is_arm(arch):  # no /proc/cpuinfo (e.g. Windows): torch's own dispatch level
        listed = set(_ATEN_CAPS.get(capability, frozenset())) - {"amx_bf16", "avx512_bf16", "avx512_vnni"}
        if capability == "AVX512":
            listed |= {"avx512f"}
    return features_from(arch, model, listed, capability, os.environ.get("ONEDNN_MAX_CPU_ISA"),
                         physical_cores(), logical)


def memory_bandwidth(nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """Copy bandwidth in GB/s (bytes read + written), best of `repeats` copies of `nbytes` (measured per call)."""
    import torch  # waits: early_environment() runs before torch (the module's note)

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def detect_from_text(cpuinfo: str, capability: str = "AVX512", onednn_max_isa: str | None = None,
                     cores: int = 2, arch: str = "x86_64") -> CpuFeatures:
    """The features a canned /proc/cpuinfo text describes, under the given torch caps (tests, other machines)."""
    model, x86, arm = parse_cpuinfo(cpuinfo)
    return features_from(arch, model, arm if is_arm(arch) else x86, capability, onednn_max_isa, cores, cores)


def with_bandwidth(features: CpuFeatures | None = None) -> CpuFeatures:
    f = features or detect()
    return replace(f, bandwidth_gbs=memory_bandwidth())


# ---------------------------------------------------------------------------------------------
# choices
# ---------------------------------------------------------------------------------------------

def native_bf16(features: CpuFeatures, onednn: bool | None = None) -> bool:
    """Whether a bf16 GEMM runs in hardware. `onednn`: oneDNN's own answer on this machine, which decides where
    it was asked (it honours ONEDNN_MAX_CPU_ISA and the real CPU); else the instruction set: AMX-BF16,
    AVX512-BF16, or ARM's bf16 extension."""
    if onednn is not None:
        return onednn
    return any(features.has(f) for f in ("amx_bf16", "avx512_bf16")) or (is_arm(features.arch)
                                                                         and features.has("bf16"))


def cpu_compute_dtype(features: CpuFeatures, onednn: bool | None = None) -> tuple[torch.dtype, str]:
    """(compute dtype, the reason in words) for the CPU path; bf16 only where it is native (`native_bf16`)."""
    import torch  # waits: early_environment() runs before torch (the module's note)

    listed = native_bf16(features)
    if not native_bf16(features, onednn):
        if listed:
            return torch.float32, "fp32 compute: oneDNN runs no native bf16 GEMM here (its ISA cap or this torch)"
        return torch.float32, "fp32 compute: this CPU has no native bf16"
    if features.has("amx_bf16"):
        return torch.bfloat16, "bf16 compute: this CPU has native bf16 (AMX)"
    if features.has("avx512_bf16"):
        return torch.bfloat16, "bf16 compute: this CPU has native bf16 (AVX512-BF16)"
    if is_arm(features.arch) and features.has("bf16"):
        return torch.bfloat16, "bf16 compute: this CPU has native bf16 (ARM bf16)"
    return torch.bfloat16, "bf16 compute: oneDNN runs bf16 GEMMs natively here"


__all__ = ["ARM_FEATURES", "CpuFeatures", "X86_FEATURES", "allowed_x86", "cpu_compute_dtype", "detect", "detect_from_text",
           "features_from", "memory_bandwidth", "native_bf16", "parse_cpuinfo", "parse_sysctl", "physical_cores",
           "with_bandwidth"]
