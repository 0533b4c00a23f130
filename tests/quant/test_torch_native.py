"""The torch-native packed-weight backend (quant/backends/torch_native.py): formulas, layouts, bytes, payloads.

Outputs are checked against an independent fp32 computation of the format's dequantization formula
(int8: q * s per row; int4: (q - 8) * scale + zero per group), with q, s, z read back from the layer.
Tolerances follow the kernel's documented arithmetic, not the code: the CPU kernels take bf16
activations and return bf16, so the bound is the bf16 rounding of the input (2^-9 relative per
element, summed over K) and of the output (2^-9 of |y|) plus fp32 accumulation error.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from offload.accounting import module_nbytes
import quant
from quant import QuantFormatError, QuantSpec, export_quantized, quantize_linear_from_weight, restore_quantized
from quant.backends import REGISTRY
from quant.backends import torch_native as tn

CPU = torch.device("cpu")
BF16_EPS = 2.0 ** -8  # unit roundoff of bf16 (8 significand bits): |round(v) - v| <= 2^-8 |v|


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)


def _kernel_bound(x: torch.Tensor, w_dq: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Elementwise bound for y = bf16(x) @ w_dq^T computed in fp32 and rounded to bf16."""
    mag = x.abs().float() @ w_dq.abs().t()
    return BF16_EPS * mag + 1e-6


@pytest.mark.parametrize("fmt,rows", [("int4", 3), ("int4", 48), ("int8", 3), ("int8", tn.CAST_ABOVE_ROWS + 8)])
@pytest.mark.parametrize("cd", [torch.bfloat16, torch.float32])
def test_forward_matches_dequantized_formula(fmt: str, rows: int, cd: torch.dtype) -> None:
    n, k = 96, 256
    layer = tn.build(_weight(n, k), torch.randn(n).to(cd), fmt, CPU, QuantSpec(fmt, group_size=64), cd)
    x = torch.randn(2, rows, k, generator=torch.Generator().manual_seed(1)).to(cd)
    y = layer(x)
    assert y.dtype == cd and y.shape == (2, rows, n)
    if fmt == "int8":
        w_dq = layer.qweight.float() * layer.scale.float()[:, None]
    else:  # independent unpacking of the stored nibbles, from the documented layout of this CPU's kernel
        q = tn.unpack_int4(layer.packed.data, layer.layout).float()
        sz = layer.scales_and_zeros.float()  # [K/g, N, 2]
        s = sz[..., 0].t().repeat_interleave(64, dim=1)
        z = sz[..., 1].t().repeat_interleave(64, dim=1)
        w_dq = (q - 8.0) * s + z
    # the kernel's input (documented: bf16 activations); the int8 prefill path runs in cd itself
    cast_path = fmt == "int8" and 2 * rows > tn.CAST_ABOVE_ROWS
    xb = x.reshape(-1, k).float() if cast_path else x.reshape(-1, k).to(torch.bfloat16).float()
    ref = xb @ w_dq.t()
    got = (y.reshape(-1, n).float() - layer.bias.float())
    # bound: bf16 rounding of the output (and of the bias add in cd), plus rounding of the dequantized
    # weight should the kernel form it in bf16; activations are already bf16 in ref
    bound = _kernel_bound(xb, w_dq, ref) + 2 * BF16_EPS * (ref.abs() + layer.bias.float().abs())
    assert ((got - ref).abs() <= bound).all()


def test_quantizers_are_nearest_level_within_half_a_step() -> None:
    w = _weight(64, 256, seed=3).float()
    original = w.clone()
    q, sz = tn.quantize_int4_groups(w, 128, torch.bfloat16)
    tn.quantize_int8_rows(w, torch.bfloat16)
    assert torch.equal(w, original)  # an fp32 source weight is never modified in place
    s = sz[..., 0].float().t().repeat_interleave(128, 1)
    z = sz[..., 1].float().t().repeat_interleave(128, 1)
    dq = (q.float() - 8) * s + z
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    # min/max grid: every weight is within half a step (plus the bf16 rounding of scale and zero)
    assert ((dq - w).abs() <= 0.5 * s * (1 + 1e-3) + 2 * BF16_EPS * z.abs()).all()
    q8, s8 = tn.quantize_int8_rows(w, torch.bfloat16)
    assert s8.dtype == torch.bfloat16 and int(q8.abs().max()) <= 127
    assert ((q8.float() * s8.float()[:, None] - w).abs() <= 0.5 * s8.float()[:, None] * (1 + 1e-3)).all()
    # relative error of the matmul against fp32, derived from the formats (int4: 1/30 of a range per weight)
    x = torch.randn(8, 256)
    rel4 = ((x @ dq.t()) - x @ w.t()).norm() / (x @ w.t()).norm()
    assert rel4 < 0.12


@pytest.mark.parametrize("layout", [tn.PORTABLE, *tn.CPU_LAYOUTS])
def test_int4_layouts_round_trip(layout: str) -> None:
    q = torch.randint(0, 16, (112, 64), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    packed = tn.pack_int4(q, layout)
    assert packed.shape == (112, 32) and packed.dtype == torch.uint8
    assert torch.equal(tn.unpack_int4(packed, layout), q)


def test_this_cpus_kernel_layout_is_one_we_can_read() -> None:
    # ISA-tolerant: which layout the kernel uses depends on the instruction set ATen dispatched
    # (AVX-512 -> 64-row blocks, AVX2 -> 32-row blocks, scalar -> row pairs); the assertion is that
    # our pure-torch packer reproduces the kernel's own bytes, whatever that layout is here.
    layout = tn.cpu_int4_layout()
    assert layout in tn.CPU_LAYOUTS, f"unknown int4 kernel layout on {torch.backends.cpu.get_cpu_capability()}"
    q = torch.randint(0, 16, (208, 128), generator=torch.Generator().manual_seed(6), dtype=torch.int32)
    assert torch.equal(tn.pack_int4(q, layout), torch._convert_weight_to_int4pack_for_cpu(q, 2))


@pytest.mark.parametrize("fmt,n,k,bias", [("int4", 96, 256, True), ("int4", 64, 128, False), ("int8", 40, 72, True),
                                          ("int4", 40, 72, False)])  # last: no int4 group fits -> int8
@pytest.mark.parametrize("cd", [torch.bfloat16, torch.float32])
def test_layout_nbytes_equals_module_nbytes(fmt: str, n: int, k: int, bias: bool, cd: torch.dtype) -> None:
    # Through the registry's chain, which asks the backend whether it holds the shape (`accepts`).
    spec = quant.resolve(QuantSpec(fmt, "native", group_size=128, compute_dtype=cd), CPU, (n, k))
    layer = quantize_linear_from_weight(_weight(n, k), torch.randn(n) if bias else None, spec, CPU, cd)
    lay = tn.layout_nbytes(n, k, bias, spec.format, spec, cd, "cpu")
    assert module_nbytes(layer) == lay["total"]
    kind = tn.kind(layer)
    assert kind.format == ("int4" if isinstance(layer, tn.PackedInt4Linear) else "int8")
    if fmt == "int4" and kind.format == "int4":
        assert lay["packed"] == n * k // 2


def test_the_backend_refuses_int4_shapes_its_kernel_cannot_hold() -> None:
    # 72 inputs: no group of 32..256 divides them; 40 outputs: not a multiple of 16.
    spec = QuantSpec("int4", "native", group_size=128)
    assert tn.accepts((96, 256), "int4", "cpu", spec) is None and tn.accepts((40, 72), "int8", "cpu", spec) is None
    assert tn.accepts((40, 72), "int4", "cpu", spec) and tn.accepts((40, 256), "int4", "cpu", spec)
    with pytest.raises(QuantFormatError, match="int4 kernel needs"):
        tn.build(_weight(40, 72), None, "int4", CPU, spec, torch.bfloat16)
    assert quant.resolve(spec, CPU, (40, 72)).format == "int8" and quant.resolve(spec, CPU, (96, 256)).format == "int4"


def test_export_restore_is_bitwise_identical_through_safetensors(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setitem(REGISTRY, tn.name, tn)  # the lead registers it; here only for the payload round trip
    model = nn.Sequential(nn.Linear(256, 96), nn.Linear(96, 64, bias=False))
    with torch.no_grad():
        model[0] = tn.build(model[0].weight, model[0].bias, "int4", CPU, QuantSpec("int4", group_size=64), torch.float32)
        model[1] = tn.build(model[1].weight, None, "int8", CPU, QuantSpec("int8"), torch.bfloat16)
    tensors, entries = export_quantized(model)
    assert entries["0"]["layout"] == tn.cpu_int4_layout() and entries["0"]["format"] == "int4"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "q.safetensors")
    skeleton = nn.Sequential(nn.Linear(256, 96, device="meta"), nn.Linear(96, 64, bias=False, device="meta"))
    restore_quantized(skeleton, load_file(tmp_path / "q.safetensors"), entries)
    x = torch.randn(5, 256)
    assert torch.equal(skeleton(x), model(x))
    assert module_nbytes(skeleton) == module_nbytes(model)
    # same layout here: the stored bytes are taken as they are (no repack at load)
    for name in ("0", "1"):
        a, b = export_quantized(skeleton.get_submodule(name))[0], export_quantized(model.get_submodule(name))[0]
        assert a.keys() == b.keys() and all(torch.equal(a[c], b[c]) for c in a)


@pytest.mark.parametrize("stored", [tn.PORTABLE, *tn.CPU_LAYOUTS])
def test_restore_from_another_cpus_layout(stored: str) -> None:
    # A checkpoint written on a CPU whose kernel packs differently (e.g. AVX-512 read on AVX2) is
    # converted in pure torch; the result must compute exactly what the original layer computes.
    layer = tn.build(_weight(96, 256), None, "int4", CPU, QuantSpec("int4", group_size=128), torch.bfloat16)
    tensors, fields = tn.export(layer)
    q = tn.unpack_int4(tensors["packed"], fields["layout"])
    entry = {**fields, "layout": stored, "shape": [96, 256], "bias": False}
    restored = tn.restore(entry, {**tensors, "packed": tn.pack_int4(q, stored)}, CPU)
    x = torch.randn(4, 256).to(torch.bfloat16)
    assert restored.layout == tn.cpu_int4_layout()
    assert torch.equal(restored(x), layer(x))


def test_expected_matches_export() -> None:
    for fmt in ("int4", "int8"):
        layer = tn.build(_weight(64, 256), torch.randn(64), fmt, CPU, QuantSpec(fmt), torch.float32)
        tensors, fields = tn.export(layer)
        want = tn.expected({**fields, "shape": [64, 256], "bias": True})
        assert {c: (tuple(t.shape), t.dtype) for c, t in tensors.items()} == want


def test_mps_code_path_ops_on_cpu() -> None:
    # The MPS path runs `_weight_int8pack_mm` with the compute dtype itself (no bf16 detour): that op
    # exists on CPU, so it is exercised here in fp16 and fp32 with the layer's own int8 payload.
    # `_convert_weight_to_int4pack`/`_weight_int4pack_mm` have no CPU kernel; what the MPS int4 path
    # feeds them is the portable [N, K/2] layout (even k in the high nibble, as in PyTorch's tests),
    # checked here to hold exactly the q that the CPU kernel computes with.
    layer = tn.build(_weight(64, 128), None, "int8", CPU, QuantSpec("int8"), torch.float32)
    x = torch.randn(3, 128)
    ref = x @ (layer.qweight.float() * layer.scale.float()[:, None]).t()
    for dt, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        y = torch._weight_int8pack_mm(x.to(dt), layer.qweight, layer.scale.to(dt)).float()
        assert ((y - ref).abs() <= tol * (x.abs() @ (layer.qweight.float().abs() * layer.scale.float()[:, None]).t()) + 1e-4).all()
    q = torch.randint(0, 16, (64, 128), dtype=torch.uint8)
    portable = tn.pack_int4(q, tn.PORTABLE)
    assert torch.equal(portable, (q[:, ::2] << 4) | q[:, 1::2])
    assert tn.unavailable_reason(torch.device("cuda")) is not None


def test_unavailable_and_auto_priorities() -> None:
    assert tn.unavailable_reason(torch.device("meta")) == "cannot quantize on the meta device"
    assert tn.unavailable_reason(CPU) is None
    # ranked after quanto for int4/int8 so the existing auto chains keep their first choice
    from quant.backends import quanto

    assert tn.auto["int4"][1] > quanto.auto["int4"][1] and tn.auto["int8"][1] > quanto.auto["int8"][1]



def test_int4_kernel_takes_its_packed_weight_at_any_8_byte_alignment() -> None:
    # Why "packed" is in `zero_copy_components`: a payload read zero-copy from a safetensors mmap is only
    # 8-byte aligned. ISA-tolerant: checked on whichever int4 layout this CPU's kernel uses. (int8 is not
    # exercised at 8 bytes: `_weight_int8pack_mm` crashes the process there.)
    assert "packed" in tn.zero_copy_components and "qweight" not in tn.zero_copy_components
    layer = tn.build(_weight(128, 256), None, "int4", CPU, QuantSpec("int4"), torch.bfloat16)
    t = layer.packed.data
    x = torch.randn(5, 256).to(torch.bfloat16)
    ref = layer(x)
    for offset in (8, 16, 48):
        buf = torch.empty(t.numel() + 128, dtype=torch.uint8)
        start = (64 - buf.data_ptr() % 64) % 64 + offset
        moved = buf[start: start + t.numel()].view(t.shape).copy_(t)
        assert moved.data_ptr() % 64 == offset
        layer.packed = nn.Parameter(moved, requires_grad=False)
        assert torch.equal(layer(x), ref)


@pytest.mark.parametrize("layout", list(tn.CPU_LAYOUTS))
def test_dense_prefill_weight_is_the_formula_for_every_layout(layout: str) -> None:
    # Every CPU layout is exercised here, not just this CPU's kernel layout: nibbles packed by our own
    # `pack_int4`, dequantized by `int4_prefill`, compared with (q - 8) * scale + zero computed in fp64.
    from quant.backends import int4_prefill

    n, k, gs = 192, 256, 64
    gen = torch.Generator().manual_seed(7)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    sz = (torch.rand(k // gs, n, 2, generator=gen) * torch.tensor([0.02, 0.1]) - torch.tensor([0.0, 0.05]))
    sz = sz.to(torch.bfloat16)
    packed = tn.pack_int4(q, layout)
    s = sz[..., 0].double().t().repeat_interleave(gs, dim=1)
    z = sz[..., 1].double().t().repeat_interleave(gs, dim=1)
    ref = ((q.double() - 8.0) * s + z).t()  # [K, N]
    offset = (z - 8.0 * s).t()
    for dtype in (torch.float32, torch.bfloat16):
        got = int4_prefill.dense_weight(packed, sz, gs, tn.CPU_LAYOUTS[layout], dtype).double()
        eps = torch.finfo(dtype).eps
        # roundings: the offset stored in `dtype`, q * scale, and the sum (|q * scale| <= |w| + |offset|)
        bound = eps * (2 * ref.abs() + 2 * offset.abs()) + 1e-12
        assert ((got - ref).abs() <= bound).all(), dtype


@pytest.mark.parametrize("cd", [torch.bfloat16, torch.float32])
def test_prefill_sized_int4_calls_take_the_dense_path_and_agree_with_the_kernel(cd: torch.dtype) -> None:
    from quant.backends import int4_prefill

    n, k = 128, 256
    layer = tn.build(_weight(n, k), None, "int4", CPU, QuantSpec("int4", group_size=64), cd)
    rows = int4_prefill.DENSE_ABOVE_ROWS + 1
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(2)).to(cd)
    dense = layer(x)
    kernel = torch.cat([layer(x[i:i + 1]) for i in range(rows)])  # one row at a time: the kernel
    assert torch.equal(layer(x), dense)  # the reused buffers give the same result call after call
    q = tn.unpack_int4(layer.packed.data, layer.layout).double()
    sz = layer.scales_and_zeros.double()
    w_dq = (q - 8.0) * sz[..., 0].t().repeat_interleave(64, 1) + sz[..., 1].t().repeat_interleave(64, 1)
    ref = x.double() @ w_dq.t()
    mag = x.double().abs() @ w_dq.abs().t()
    for y in (dense, kernel):  # both within bf16 rounding of the weight, the activations and the output
        assert ((y.double() - ref).abs() <= 4 * BF16_EPS * mag + 1e-6).all()


@pytest.mark.parametrize("native", [True, False])
def test_prefill_keeps_the_int4_kernel_where_the_dense_gemm_has_no_real_kernel(monkeypatch: pytest.MonkeyPatch,
                                                                               native: bool) -> None:
    # On an AVX2-only CPU a bf16 dense GEMM is a fallback ~50x slower than the int4 kernel: the dense prefill
    # path is taken only where `dense_gemm_is_native` (oneDNN's bf16 support, which honours its ISA cap).
    from torch.profiler import profile

    from quant.backends import int4_prefill

    assert int4_prefill.dense_gemm_is_native(torch.float32)  # fp32 GEMMs are native everywhere
    monkeypatch.setattr(int4_prefill, "dense_gemm_is_native", lambda dtype: native)
    layer = tn.build(_weight(128, 256), None, "int4", CPU, QuantSpec("int4", group_size=64), torch.bfloat16)
    x = torch.randn(int4_prefill.DENSE_ABOVE_ROWS + 1, 256).bfloat16()
    with profile() as prof:
        layer(x)
    ops = {e.key for e in prof.key_averages()}
    assert ("aten::_weight_int4pack_mm_for_cpu" in ops) == (not native)
