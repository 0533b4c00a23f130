"""The CPU path: instruction-set detection, compute-dtype choice, threads, bf16-storage/fp32-compute, and
the alignment-keeping copy the offloader uses.

Detection is tested on canned /proc/cpuinfo and sysctl texts (so these hold on any machine); the
assertions about *this* machine only check consistency (what is usable is what is listed and allowed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lite.model.modeling_aimv2 import VisualEmbedding
from lite.runtime import hardware as hw
from offload.tensors import CPU_ALIGNMENT, copy_to, cpu_copy_keeping_alignment
from lite.runtime.cpu import threads
from lite.runtime.cpu.compute import SMALL_ROWS, use_fp32_compute
from lite.runtime.cpu.plan import PROCESS, WaitPolicy
from quant.int8 import Int8VisualEmbedding

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu vme sse sse2 avx f16c fma avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi1 bmi2 sha_ni
"""
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""
GRAVITON2 = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
CPU part\t: 0xd0c
"""
APPLE_M2_SYSCTL = {"hw.optional.AdvSIMD": "1", "hw.optional.arm.FEAT_BF16": "1", "hw.optional.arm.FEAT_I8MM": "1",
                   "hw.optional.arm.FEAT_DotProd": "1"}
APPLE_M1_SYSCTL = {"hw.optional.AdvSIMD": "1", "hw.optional.arm.FEAT_BF16": "0", "hw.optional.arm.FEAT_I8MM": "0",
                   "hw.optional.arm.FEAT_DotProd": "1"}


def _features(text: str, arch: str = "x86_64", capability: str = "AVX512", onednn: str | None = None) -> hw.CpuFeatures:
    model, x86, arm = hw.parse_cpuinfo(text)
    return hw.features_from(arch, model, arm if hw.is_arm(arch) else x86, capability, onednn, 4, 8)


def test_sapphire_rapids_gets_bf16_for_amx() -> None:
    f = _features(SAPPHIRE_RAPIDS)
    assert f.model == "Intel(R) Xeon(R) Platinum 8488C"
    assert f.features == ("amx_bf16", "avx512_bf16", "avx512_vnni", "avx512f", "avx2", "fma")
    assert hw.native_bf16(f)
    assert hw.cpu_compute_dtype(f) == (torch.bfloat16, "bf16 compute: this CPU has native bf16 (AMX)")


def test_epyc_avx2_gets_fp32() -> None:
    f = _features(EPYC_AVX2, capability="AVX2")
    assert f.features == ("avx2", "fma") and not hw.native_bf16(f)
    assert hw.cpu_compute_dtype(f) == (torch.float32, "fp32 compute: this CPU has no native bf16")
    assert "AMD EPYC 7B12" in f.describe() and "avx2 fma" in f.describe()


def test_caps_lower_what_counts() -> None:
    # ATEN_CPU_CAPABILITY=avx2 / ONEDNN_MAX_CPU_ISA=AVX2 on an AMX machine: bf16 is no longer native
    for cap, onednn in (("AVX2", None), ("AVX512", "AVX2"), ("AVX512", "AVX512_CORE")):
        f = _features(SAPPHIRE_RAPIDS, capability=cap, onednn=onednn)
        assert not hw.native_bf16(f), (cap, onednn)
        assert "amx_bf16" in f.listed and f.notes
    f = _features(SAPPHIRE_RAPIDS, onednn="AVX512_CORE_BF16")
    assert hw.cpu_compute_dtype(f)[1].endswith("(AVX512-BF16)")


def test_arm_linux_and_macos() -> None:
    g3 = _features(GRAVITON3, arch="aarch64", capability="DEFAULT")
    assert g3.features == ("neon", "bf16", "i8mm", "dotprod") and hw.native_bf16(g3)
    assert hw.cpu_compute_dtype(g3)[1] == "bf16 compute: this CPU has native bf16 (ARM bf16)"
    assert "0xd40" in g3.model
    g2 = _features(GRAVITON2, arch="aarch64", capability="DEFAULT")
    assert g2.features == ("neon", "dotprod") and hw.cpu_compute_dtype(g2)[0] == torch.float32
    m2 = hw.features_from("arm64", "Apple M2", hw.parse_sysctl(APPLE_M2_SYSCTL), "DEFAULT", None, 8, 8)
    assert m2.features == ("neon", "bf16", "i8mm", "dotprod") and hw.native_bf16(m2)
    m1 = hw.features_from("arm64", "Apple M1", hw.parse_sysctl(APPLE_M1_SYSCTL), "DEFAULT", None, 8, 8)
    assert m1.features == ("neon", "dotprod") and not hw.native_bf16(m1)


def test_this_machine_is_consistent() -> None:
    # ISA-tolerant: whatever this CPU is, the usable features are the listed ones the caps allow,
    # and the dtype follows them.
    f = hw.detect()
    assert set(f.features) <= set(f.listed)
    assert f.physical_cores >= 1 and f.capability == torch.backends.cpu.get_cpu_capability()
    dtype, why = hw.cpu_compute_dtype(f)
    assert (dtype == torch.bfloat16) == hw.native_bf16(f) and why.startswith("bf16" if dtype == torch.bfloat16 else "fp32")
    d = f.to_dict()
    assert d["native_bf16"] == hw.native_bf16(f) and isinstance(d["features"], list)


def test_early_environment_sleeps_idle_threads_only_on_shared_cpus_and_respects_the_user() -> None:
    shared, idle = (True, "CPU pressure 34.7% over 10 s"), (False, "CPU pressure 0.0% over 10 s")
    assert threads.early_environment({}, shared) == {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    assert PROCESS.wait is not None and "sleep" in PROCESS.wait.reason and "34.7%" in PROCESS.wait.reason
    assert threads.early_environment({}, idle) == {"TOKENIZERS_PARALLELISM": "false"}  # OpenMP's own default
    assert PROCESS.wait is not None and "spin" in PROCESS.wait.reason
    user = {"OMP_WAIT_POLICY": "ACTIVE", "TOKENIZERS_PARALLELISM": "true"}
    assert threads.early_environment(user, shared) == {}
    assert PROCESS.wait == WaitPolicy("ACTIVE", "set by the environment")


def test_cpu_contention_reads_pressure_stall_information(tmp_path: Path) -> None:
    psi = tmp_path / "cpu"
    psi.write_text("some avg10=34.70 avg60=15.69 avg300=4.53 total=279804717\n"
                   "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert threads.cpu_contention(str(psi)) == (True, "CPU pressure 34.7% over 10 s")
    psi.write_text("some avg10=0.41 avg60=0.02 avg300=1.35 total=264958680\n")
    assert threads.cpu_contention(str(psi)) == (False, "CPU pressure 0.4% over 10 s")
    # no PSI (older kernels, macOS): the load average, shared from half a load per CPU
    shared, reading = threads.cpu_contention(str(tmp_path / "missing"))
    load = os.getloadavg()[0]
    assert shared == (load >= 0.5 * (os.cpu_count() or 1)) and reading.startswith("load average")
    psi.write_text("garbage\n")
    assert threads.cpu_contention(str(psi))[1].startswith("load average")


def test_configure_threads_in_a_fresh_process() -> None:
    code = ("import torch; from lite.runtime.cpu import threads as hw; n = hw.configure_threads(1); "
            "torch.ones(4) @ torch.ones(4); m = hw.configure_threads(None); "
            "print(n, torch.get_num_threads(), torch.get_num_interop_threads(), m == hw.physical_cores())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    n, _threads_now, interop, default_is_physical = out.stdout.split()
    assert (n, interop, default_is_physical) == ("1", "1", "True")
    with pytest.raises(ValueError):
        threads.configure_threads(0)


# ----------------------------------------------------------------------------- bf16 storage, fp32 compute

class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.lin = nn.Linear(32, 48)
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.emb = nn.Embedding(10, 32)
        self.gain = nn.Parameter(torch.randn(48))  # a parameter the parent uses itself (like a modulation table)

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x + self.emb(ids))
        y = self.lin(h) * self.gain
        return self.conv(y.reshape(y.shape[0], 4, 12)).flatten(1)


def test_fp32_compute_keeps_bf16_weights_and_matches_fp32_math() -> None:
    torch.manual_seed(0)
    model = _Block().to(torch.bfloat16)
    rows = SMALL_ROWS + 8  # above the decode-sized rule (tested below)
    ids, x = torch.randint(0, 10, (rows,)), torch.randn(rows, 32)
    reference = _Block()
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})  # same (bf16) values in fp32
    expected = reference(ids, x)
    bf16_out = model(ids, x.bfloat16())
    with use_fp32_compute(model) as state:
        y = model(ids, x)
        assert y.dtype == torch.float32
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # storage unchanged
        assert state.swapped >= 3
    assert torch.allclose(y, expected, atol=1e-5, rtol=1e-5)  # fp32 arithmetic, bf16-valued weights
    assert (y - expected).abs().max() < (bf16_out.float() - expected).abs().max()
    assert model(ids, x.bfloat16()).dtype == torch.bfloat16  # removed: back to bf16 compute


def test_fp32_compute_decode_sized_linear_runs_the_stored_bf16_gemv() -> None:
    lin = nn.Linear(32, 48).to(torch.bfloat16)
    x = torch.randn(2, SMALL_ROWS // 2, 32)  # SMALL_ROWS rows in all: decode-sized
    with use_fp32_compute(lin):
        y = lin(x)
        big = lin(torch.randn(SMALL_ROWS + 1, 32))
    assert y.dtype == torch.float32 and big.dtype == torch.float32
    assert torch.equal(y, F.linear(x.bfloat16(), lin.weight, lin.bias).float())


def test_fp32_compute_vte_tables() -> None:
    torch.manual_seed(1)
    table = torch.randn(40, 16)
    vte = VisualEmbedding(40, 16)
    vte.weight.data = table.bfloat16()
    vte.block_rows = 7  # several blocks, uneven
    probs = torch.softmax(torch.randn(2, 5, 36), -1)
    ref = probs @ table.bfloat16().float()[:36]
    with use_fp32_compute(vte):
        got = vte(probs)
        assert got.dtype == torch.float32 and vte.weight.dtype == torch.bfloat16
    assert torch.allclose(got, ref, atol=1e-6, rtol=1e-5)
    assert vte.compute_dtype is None  # removed
    # fp32 table: the reference's own matmul, unchanged (bitwise)
    vte32 = VisualEmbedding(40, 16)
    vte32.weight.data = table
    assert torch.equal(vte32(probs), probs @ table[:36])
    q = Int8VisualEmbedding.from_weight(table, compute_dtype=torch.bfloat16)
    with use_fp32_compute(q):
        assert q.compute_dtype == torch.float32 and q(probs).dtype == torch.float32
    assert q.compute_dtype == torch.bfloat16


# ----------------------------------------------------------------------------- offload copies

@pytest.mark.parametrize("offset_elems", [0, 1, 3, 4, 12])
def test_cpu_copy_keeps_alignment_and_bits(offset_elems: int) -> None:
    base = torch.randn(1000)
    t = base[offset_elems: offset_elems + 600].view(20, 30)  # like a tensor inside an mmapped file
    c = cpu_copy_keeping_alignment(t)
    assert c.data_ptr() % CPU_ALIGNMENT == t.data_ptr() % CPU_ALIGNMENT
    assert c.data_ptr() != t.data_ptr() and torch.equal(c, t) and c.shape == t.shape and c.is_contiguous()
    p = copy_to(nn.Parameter(t, requires_grad=False), "cpu")
    assert isinstance(p, nn.Parameter) and p.data_ptr() % CPU_ALIGNMENT == t.data_ptr() % CPU_ALIGNMENT
    # same address modulo 64 -> same kernel path -> the same bits from a GEMM
    w = torch.randn(64, 30)
    assert torch.equal(F.linear(w, t), F.linear(w, c))


def test_hardware_module_imports_without_torch() -> None:
    # early_environment() must be callable before torch is imported: OpenMP reads it once, at start-up
    code = ("import sys; from lite.runtime.cpu.threads import early_environment; early_environment(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


# -- one-row dense layers as torch.mv (lite/runtime/cpu/row_gemv.py) -----------------------------------------

def _kernels(fn) -> set[str]:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_row_gemv_is_the_same_linear_as_a_matrix_vector_product() -> None:
    from lite.runtime.cpu.row_gemv import use_row_gemv

    torch.manual_seed(0)
    lin = nn.Linear(64, 40).to(torch.bfloat16)
    x = torch.randn(1, 1, 64).bfloat16()
    before = F.linear(x, lin.weight, lin.bias)
    state = use_row_gemv(nn.Sequential(lin, nn.Linear(40, 8)), kernel="mv")  # the fp32 layer is left alone
    assert state.layers == [lin]
    assert "aten::addmv" in _kernels(lambda: lin(x))
    y = lin(x)
    assert y.shape == (1, 1, 40) and y.dtype == torch.bfloat16
    assert torch.equal(y, before)  # on the same machine, at this size, the same accumulation: bitwise
    # and it is W x + b (fp32-accumulated, one bf16 rounding), computed independently in float64
    want = x[0, 0].double() @ lin.weight.double().t()
    assert torch.allclose(y[0, 0].double(), (want.bfloat16().double() + lin.bias.double()), atol=0.02, rtol=0.01)
    rows = torch.randn(3, 64).bfloat16()
    assert "aten::addmv" not in _kernels(lambda: lin(rows))  # more rows: the GEMM
    assert torch.equal(lin(rows), F.linear(rows, lin.weight, lin.bias))
    state.remove()
    assert "forward" not in lin.__dict__ and "aten::addmv" not in _kernels(lambda: lin(x))


def test_use_row_gemv_follows_the_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    from lite.runtime.cpu import row_gemv

    from lite.runtime.cpu.probes import this_machine_plan

    assert row_gemv.measure_one_row_kernel(torch.bfloat16) in row_gemv.ONE_ROW_KERNELS
    plan = this_machine_plan()  # measured once per process, held by the plan
    assert plan.one_row_kernel.value in row_gemv.ONE_ROW_KERNELS and this_machine_plan() is plan
    x = torch.randn(1, 16).bfloat16()
    for kernel in row_gemv.ONE_ROW_KERNELS:
        monkeypatch.setattr(row_gemv, "measure_one_row_kernel", lambda dtype, kernel=kernel: kernel)
        lin = nn.Linear(16, 8).to(torch.bfloat16)
        want = F.linear(x, lin.weight, lin.bias)
        assert row_gemv.use_row_gemv(lin).layers == ([] if kernel == "linear" else [lin])
        assert ("forward" in lin.__dict__) == (kernel != "linear")
        # every kernel is W x + b with fp32 accumulation: equal within one bf16 rounding of the result
        assert torch.allclose(lin(x).float(), want.float(), atol=1e-2, rtol=2 ** -7)
    assert torch.backends.mkldnn.enabled  # "mv-aten" restores the process-wide flag
    with pytest.raises(ValueError, match="kernel must be one of"):
        row_gemv.use_row_gemv(nn.Linear(4, 4), kernel="blas")


def test_row_gemv_under_fp32_compute_returns_fp32_from_the_stored_weight() -> None:
    from lite.runtime.cpu.row_gemv import use_row_gemv

    lin = nn.Linear(32, 48, bias=False).to(torch.bfloat16)
    use_row_gemv(lin, kernel="mv")
    x = torch.randn(1, 32)
    with use_fp32_compute(lin):
        assert "aten::mv" in _kernels(lambda: lin(x))
        y = lin(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, F.linear(x.bfloat16(), lin.weight).float())


def test_cpu_pipeline_runs_the_head_as_a_matrix_vector_product_where_measured_faster(tiny_dir) -> None:
    from lite import OvisPipeline

    pipe = OvisPipeline.from_pretrained(tiny_dir, device="cpu", progress=False)
    head = pipe.model.llm.lm_head
    assert head.weight is pipe.model.llm.model.embed_tokens.weight
    # CPU-dependent by design: the one-row kernel is the one this CPU measures fastest (Intel Xeon AMX:
    # oneDNN's mv; AMD EPYC Zen 4: ATen's mv); the assertion is that the pipeline follows the measurement
    assert ("forward" in head.__dict__) == (pipe.cpu_plan.one_row_kernel.value != "linear")
