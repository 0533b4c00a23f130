"""The CPU plan (lite/runtime/cpu/plan.py): built for any CPU from canned /proc/cpuinfo text, probing nothing here."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from lite.runtime.cpu.plan import PACKED_COMPONENTS, CpuPlan, CpuProbes, WaitPolicy, plan_from_cpuinfo

AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx fma avx2 bmi2
"""
ZEN5 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B45
flags\t\t: fpu sse2 avx fma avx2 avx512f avx512dq avx512_vnni avx512_bf16 avx_vnni
"""
XEON_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse2 avx fma avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_avx2_only_computes_fp32_and_packs_nothing() -> None:
    plan = plan_from_cpuinfo(AVX2_ONLY, capability="AVX2", threads=4)
    assert not plan.native_bf16 and plan.compute.value == "fp32"
    assert plan.compute.reason == "fp32 compute: this CPU has no native bf16"
    assert plan.packed.value == "none" and plan.packed_components == ()
    assert plan.one_row_kernel.value == "linear" and plan.int4_layout.value == "cpu-avx2"
    assert plan.threads.value == "4" and "AMD EPYC 7B12" in plan.cpu


def test_zen5_avx512_bf16_computes_bf16_packs_and_takes_atens_mv() -> None:
    plan = plan_from_cpuinfo(ZEN5, threads=2)
    assert plan.native_bf16 and plan.compute.value == "bf16" and plan.compute.reason.endswith("(AVX512-BF16)")
    assert plan.packed_components == PACKED_COMPONENTS
    assert plan.one_row_kernel.value == "mv-aten" and plan.int4_layout.value == "cpu-avx512"


def test_xeon_amx_computes_bf16_with_onednn_mv() -> None:
    plan = plan_from_cpuinfo(XEON_AMX)
    assert plan.compute.reason.endswith("(AMX)") and plan.one_row_kernel.value == "mv"


def test_onednn_is_the_one_source_of_truth_for_native_bf16() -> None:
    # the instruction set says native, oneDNN (capped, or an old build) says no: fp32 compute, nothing packed
    capped = plan_from_cpuinfo(ZEN5, probes=CpuProbes(False, True, "linear", "cpu-avx512"))
    assert not capped.native_bf16 and capped.compute.value == "fp32" and capped.packed_components == ()
    assert "oneDNN" in capped.compute.reason
    # ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 lowers the listed features too: no native bf16 from either side
    lowered = plan_from_cpuinfo(XEON_AMX, onednn_max_isa="AVX512_CORE")
    assert not lowered.native_bf16 and lowered.compute.value == "fp32"


def test_without_the_packed_ops_nothing_is_packed() -> None:
    plan = plan_from_cpuinfo(XEON_AMX, probes=CpuProbes(True, False, "mv", "cpu-avx512"))
    assert plan.native_bf16 and plan.packed_components == () and "lacks" in plan.packed.reason


def test_the_plan_is_a_frozen_value_with_a_reason_for_every_choice() -> None:
    wait = WaitPolicy("PASSIVE", "idle OpenMP threads sleep: the CPUs are shared (CPU pressure 40.0% over 10 s)")
    plan = plan_from_cpuinfo(ZEN5, wait=wait)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.threads = plan.compute  # type: ignore[misc]
    out = plan.to_dict(packed_layers=7)
    assert json.loads(json.dumps(out)) == out and out["packed_layers"] == 7
    for key in ("compute", "packed", "one_row_kernel", "int4_layout", "threads", "wait_policy", "decode_threads"):
        assert out[key]["value"] and out[key]["reason"], key
    assert out["wait_policy"] == {"value": "PASSIVE", "reason": wait.reason}
    lines = plan.describe(packed_layers=7)
    assert lines[0].startswith("cpu plan: AMD EPYC 9B45") and len(lines) == 3
    assert "compute bf16, packed Linears 7 (vision, yak), one-row kernel mv-aten, int4 layout cpu-avx512" in lines[1]
    assert "OpenMP wait PASSIVE" in lines[1] and wait.reason in lines[2] and plan.compute.reason in lines[2]
    assert plan_from_cpuinfo(ZEN5, wait=wait) == plan  # decided from its inputs alone


def test_the_plan_module_imports_without_torch() -> None:
    code = ("import sys; from lite.runtime.cpu.plan import plan_from_cpuinfo; from lite.runtime.cpu import threads; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_this_machine_plan_is_made_once(tiny_dir) -> None:
    from lite.runtime.cpu.probes import this_machine_plan
    from lite.runtime.pipeline import OvisPipeline

    plan = this_machine_plan()
    assert isinstance(plan, CpuPlan) and this_machine_plan() is plan
    pipe = OvisPipeline.from_pretrained(tiny_dir, device="cpu", progress=False)
    assert pipe.cpu_plan is plan
    shown = pipe.cpu_hooks.plan_dict()
    assert shown["packed_layers"] == pipe.cpu_hooks.packed_layers and shown["compute"] == vars(plan.compute)
