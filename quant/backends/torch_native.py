"""PyTorch's own packed-weight kernels: int8 (per-row scales) and grouped int4, on CPU and Apple MPS.

Why: they need no extra library, they exist on CPU and Metal, and on CPU they are the fastest
weight-only kernels torch ships (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`). Facts these
layers rely on (torch 2.13, measured on an AMD EPYC Zen 4 and, capped, on its AVX2 code path):

- The CPU kernels are fast only with bf16 (or fp16) activations; with fp32 activations they take a
  scalar path ~20-70x slower. So on CPU the kernel always runs in bf16 (`kernel_dtype`) and a layer
  whose `compute_dtype` is fp32 casts its input to bf16 and its output back: the cost is one M x K and
  one M x N cast, and bf16 rounding of the activations and of the result (relative 2^-9), well under
  the weight's own int4/int8 error.
- int4: dequantized w = (q - 8) * scale + zero with q in 0..15, one (scale, zero) pair per
  `group_size` inputs, stored as `scales_and_zeros` [K / group, N, 2] (tinygemm's layout, on every
  device). The weight's packed layout depends on the device and, on CPU, on the instruction set the
  kernel was dispatched for (AVX-512: 64-row blocks; AVX2: 32-row blocks; scalar: row pairs). Those
  layouts are nibble permutations, written out in `int4_layouts.pack_int4`/`unpack_int4`, so a payload stores the
  layout it was made in and a CPU with another layout converts it in pure torch; a CPU with the same
  layout takes the stored bytes as they are (no repacking at load).
- "portable" is the [N, K / 2] uint8 layout (even k in the high nibble) that MPS/CUDA's converter takes.
- Prefill-sized int4 calls on CPU run a dense GEMM over the dequantized weight (`int4_prefill`).

`auto` ranks this backend after quanto (int4/int8), so existing auto chains are unchanged; presets
name it explicitly.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import QuantFormatError
from ..formats import dtype_from_name, dtype_name, effective_group_size
from . import int4_prefill
from .int4_layouts import CPU_LAYOUTS, PORTABLE, pack_int4, unpack_int4
from .native_quantize import quantize_int4_groups, quantize_int8_rows
from .base import LayerKind, LayerSpec, Shape, element_size, layout

name = "native"
formats: tuple[str, ...] = ("int4", "int8")
#: After quanto (int4/int8 0, nf4/fp4 -> int4 1) and bnb (nf4/fp4 0), before the pure-torch int8 fallback (9);
#: no fp8 entry, so fp8 still falls back to torch's Int8Linear where quanto is missing (as before).
auto: dict[str, tuple[str, int]] = {"int4": ("int4", 1), "int8": ("int8", 1), "nf4": ("int4", 2), "fp4": ("int4", 2)}
DEVICE_TYPES: tuple[str, ...] = ("cpu", "mps")
INT4_GROUP_SIZES: tuple[int, ...] = (32, 64, 128, 256)
#: The dtype the CPU kernels run in (their fp32 path is scalar); MPS runs the compute dtype itself.
CPU_KERNEL_DTYPE = torch.bfloat16
#: On MPS/CPU the int4 converters take this many k tiles (tinygemm's default).
INNER_K_TILES = 2
#: Payload components `quant.serialize` may hand to `restore` where the file put them (no 64-byte-aligned
#: copy): the int4 kernel takes its packed weight at any 8-byte alignment with the same bits (tested on the
#: AVX-512, AVX2 and scalar paths), so a pre-quantized int4 load is the read itself. Not the int8 `qweight`:
#: `_weight_int8pack_mm` crashes on an 8- but not 16-byte-aligned weight (torch 2.13, measured).
zero_copy_components: tuple[str, ...] = ("packed", "scales_and_zeros", "bias")
#: A CPU int8 layer called on more rows than this casts its weight per call and runs a dense GEMM
#: (6144x2048 at 256 rows, AMD EPYC AVX-512: 39 ms against 154 ms in `_weight_int8pack_mm`).
CAST_ABOVE_ROWS = 32


def unavailable_reason(device: torch.device) -> str | None:
    if device.type == "meta":
        return "cannot quantize on the meta device"
    if device.type not in DEVICE_TYPES:
        return f"torch's packed-weight kernels are used here only on {', '.join(DEVICE_TYPES)}, not {device.type}"
    needed = ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu")
    missing = [op for op in needed if not hasattr(torch, op)]
    if missing:
        return f"this torch {torch.__version__} lacks {', '.join(missing)}"
    return None


@functools.cache  # a fixed fact of this torch build and its dispatch, not a choice: the probe's convert call costs
# ~16 ms (AMD EPYC Zen 5, shared), once per quantized layer without it; the CPU plan reports this value
def cpu_int4_layout() -> str:
    """The layout this process's CPU int4 kernel uses, found by packing a probe with the kernel itself.

    The kernel's layout follows the instruction set ATen dispatched (ATEN_CPU_CAPABILITY can lower it),
    so it is probed, not guessed. A layout matching none of `CPU_LAYOUTS` is reported as "cpu-opaque".
    """
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (112, 64), generator=gen, dtype=torch.int32)  # 64 + 32 + 16 rows: every tail
    ref = torch._convert_weight_to_int4pack_for_cpu(q, INNER_K_TILES)
    for candidate in CPU_LAYOUTS:
        if torch.equal(pack_int4(q, candidate), ref):
            return candidate
    return "cpu-opaque"


def device_layout(device_type: str) -> str:
    return cpu_int4_layout() if device_type == "cpu" else f"{device_type}-packed"


def int4_group_size(n: int, k: int, requested: int) -> int | None:
    """The group size an int4 layer of [n, k] gets, or None when the kernel cannot hold it (`accepts`)."""
    g = effective_group_size(k, requested)
    if g is None and k in INT4_GROUP_SIZES:
        g = k
    if g not in INT4_GROUP_SIZES or k % g or n % 16 or k % 2:
        return None
    return g


# -- layers --

def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class _PackedLinear(nn.Module):
    """Shared parts: flatten the input to 2-D, run the kernel in `kernel_dtype`, bias in `compute_dtype`."""

    in_features: int
    out_features: int

    def __init__(self, bias: torch.Tensor | None, compute_dtype: torch.dtype, kernel_dtype: torch.dtype) -> None:
        super().__init__()
        self.compute_dtype = compute_dtype
        self.kernel_dtype = kernel_dtype
        self.bias = None if bias is None else _frozen(bias.detach().to(compute_dtype))

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.kernel_dtype).contiguous()
        y = self._kernel(x2).to(self.compute_dtype)
        if self.bias is not None:
            y = y + self.bias
        y = y.reshape(*lead, self.out_features)
        return y.to(x.dtype) if x.dtype.is_floating_point and x.dtype != y.dtype else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype}, kernel_dtype={self.kernel_dtype}")


class PackedInt8Linear(_PackedLinear):
    """y = (x @ q^T) * scale (+ bias) through `torch._weight_int8pack_mm`; q int8 [N, K], scale [N]."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        kd = CPU_KERNEL_DTYPE if qweight.device.type == "cpu" else compute_dtype
        super().__init__(bias, compute_dtype, kd)
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or scale.shape != (qweight.shape[0],):
            raise ValueError(f"expected int8 [N, K] and scale [N], got {qweight.dtype} {tuple(qweight.shape)}, "
                             f"{tuple(scale.shape)}")
        self.out_features, self.in_features = qweight.shape
        self.qweight = _frozen(qweight.contiguous())
        self.scale = _frozen(scale.to(kd))

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x2, self.qweight, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, self.in_features)
        if rows <= CAST_ABOVE_ROWS or self.qweight.device.type != "cpu":
            return super().forward(x)
        # prefill-sized: the packed kernel is ~4x slower than a dense GEMM there (AMD EPYC, both ISAs);
        # cast the int8 weight (exact) to the compute dtype for this call, scale the output per row
        cd = self.compute_dtype
        y = F.linear(x.to(cd), self.qweight.to(cd)) * self.scale.to(cd)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype) if x.dtype.is_floating_point and x.dtype != y.dtype else y


class PackedInt4Linear(_PackedLinear):
    """y = x @ ((q - 8) * scale + zero)^T (+ bias); q packed in `layout`, one (scale, zero) per group."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, layout_name: str,
                 bias: torch.Tensor | None, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        kd = CPU_KERNEL_DTYPE if packed.device.type == "cpu" else compute_dtype
        super().__init__(bias, compute_dtype, kd)
        self.out_features = scales_and_zeros.shape[1]
        self.in_features = scales_and_zeros.shape[0] * group_size
        self.group_size = group_size
        self.layout = layout_name
        self.packed = _frozen(packed)
        self.scales_and_zeros = _frozen(scales_and_zeros.to(kd).contiguous())

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        if self.packed.device.type == "cpu":
            return torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        return torch._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, self.in_features)
        layout = CPU_LAYOUTS.get(self.layout)
        if rows <= int4_prefill.DENSE_ABOVE_ROWS or not int4_prefill.supports(self.packed, layout, self.out_features,
                                                                               self.compute_dtype):
            return super().forward(x)
        assert layout is not None  # prefill-sized: the kernel's cost grows with the rows (int4_prefill)
        cd = self.compute_dtype
        w = int4_prefill.dense_weight(self.packed, self.scales_and_zeros, self.group_size, layout, cd)
        y = x.reshape(-1, self.in_features).to(cd) @ w
        if self.bias is not None:
            y = y + self.bias
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y.to(x.dtype) if x.dtype.is_floating_point and x.dtype != y.dtype else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}, layout={self.layout}"


def _int4_layer(q: torch.Tensor, sz: torch.Tensor, gs: int, bias: torch.Tensor | None, device: torch.device,
                compute_dtype: torch.dtype) -> PackedInt4Linear:
    """q uint8 [N, K] (values 0..15, on any device) -> a layer in `device`'s kernel layout."""
    if device.type == "cpu":
        lay = cpu_int4_layout()
        packed = (pack_int4(q.cpu(), lay) if lay != "cpu-opaque"
                  else torch._convert_weight_to_int4pack_for_cpu(q.cpu().to(torch.int32), INNER_K_TILES))
    else:  # MPS (and CUDA's tinygemm) convert the portable [N, K/2] layout themselves
        lay = device_layout(device.type)
        packed = torch._convert_weight_to_int4pack(pack_int4(q, PORTABLE).to(device), INNER_K_TILES)
    return PackedInt4Linear(packed, sz.to(device), gs, lay, None if bias is None else bias.to(device), compute_dtype)


# -- the backend protocol --

def owns(module: nn.Module) -> bool:
    return isinstance(module, (PackedInt8Linear, PackedInt4Linear))


def kind(module: nn.Module) -> LayerKind:
    if isinstance(module, PackedInt4Linear):
        return LayerKind("int4", name, module.group_size)
    return LayerKind("int8", name)


def accepts(shape: tuple[int, int], fmt: str, device_type: str, spec: LayerSpec) -> str | None:
    """int4 where the packed kernel holds the shape (group 32..256 dividing in, out % 16 == 0); int8 always."""
    n, k = shape
    if fmt != "int4" or int4_group_size(n, k, spec.group_size) is not None:
        return None
    return f"torch's int4 kernel needs out % 16 == 0 and a group of {INT4_GROUP_SIZES} dividing in; [{n}, {k}] has not"


def _int4_group_or_refuse(n: int, k: int, spec: LayerSpec) -> int:
    why = accepts((n, k), "int4", "cpu", spec)
    if why is not None:
        raise QuantFormatError(why + " (the auto chain gives such a layer int8: quant.backends.resolve)")
    return int4_group_size(n, k, spec.group_size)


def _kernel_dtype(device_type: str, compute_dtype: torch.dtype) -> torch.dtype:
    return CPU_KERNEL_DTYPE if device_type in ("cpu", "meta") else compute_dtype


def build(weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, device: torch.device, spec: LayerSpec,
          compute_dtype: torch.dtype) -> nn.Module:
    """Quantize one [N, K] weight on `device` (an int4 shape `accepts` refuses is refused here too)."""
    n, k = weight.shape
    kd = _kernel_dtype(device.type, compute_dtype)
    with torch.no_grad():
        w = weight.detach().to(device)
        if fmt == "int4":
            gs = _int4_group_or_refuse(n, k, spec)
            b = None if bias is None else bias.to(device)
            if device.type == "cpu" and cpu_int4_layout() in CPU_LAYOUTS:
                packed, sz = quantize_int4_groups(w, gs, kd, cpu_int4_layout())
                return PackedInt4Linear(packed, sz, gs, cpu_int4_layout(), b, compute_dtype)
            q, sz = quantize_int4_groups(w, gs, kd)
            return _int4_layer(q, sz, gs, b, device, compute_dtype)
        q8, scale = quantize_int8_rows(w, kd)
        return PackedInt8Linear(q8, scale, None if bias is None else bias.to(device), compute_dtype)


def layout_nbytes(n: int, k: int, bias: bool, fmt: str, spec: LayerSpec, compute_dtype: torch.dtype,
                  device_type: str) -> dict[str, int]:
    """int4: n*k/2 packed + (k/g)*n (scale, zero) pairs in the kernel dtype; int8: n*k + n scales."""
    kd = element_size(_kernel_dtype(device_type, compute_dtype))
    bias_bytes = n * element_size(compute_dtype) if bias else 0
    if fmt == "int4":
        gs = _int4_group_or_refuse(n, k, spec)
        groups = (k // gs) * n
        return layout(n * k // 2, scales=groups * kd, zeros=groups * kd, bias=bias_bytes)
    return layout(n * k, scales=n * kd, bias=bias_bytes)


def export(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The payload as the layer holds it: on CPU the kernel's own int4 layout, named in the manifest."""
    fields: dict[str, Any] = {"compute_dtype": dtype_name(module.compute_dtype),
                              "kernel_dtype": dtype_name(module.kernel_dtype)}
    if isinstance(module, PackedInt4Linear):
        if module.layout not in CPU_LAYOUTS and module.layout != PORTABLE:
            raise QuantFormatError(f"an int4 layer in layout {module.layout!r} cannot be exported; "
                                   "quantize on a CPU to write a pre-quantized checkpoint")
        tensors = {"packed": module.packed.data, "scales_and_zeros": module.scales_and_zeros.data}
        fields.update(format="int4", group_size=module.group_size, layout=module.layout, torch=torch.__version__)
    else:
        tensors = {"qweight": module.qweight.data, "scale": module.scale.data}
        fields.update(format="int8")
    if module.bias is not None:
        tensors["bias"] = module.bias.data
    return tensors, fields


def expected(entry: Mapping[str, Any]) -> dict[str, tuple[Shape, torch.dtype]]:
    n, k = entry["shape"]
    kd = dtype_from_name(entry["kernel_dtype"])
    if entry["format"] == "int4":
        gs = int(entry["group_size"])
        if gs not in INT4_GROUP_SIZES or k % gs:
            raise ValueError(f"int4 group size {gs} does not fit in_features {k}")
        out: dict[str, tuple[Shape, torch.dtype]] = {"packed": ((n, k // 2), torch.uint8),
                                                     "scales_and_zeros": ((k // gs, n, 2), kd)}
    else:
        out = {"qweight": ((n, k), torch.int8), "scale": ((n,), kd)}
    if entry["bias"]:
        out["bias"] = ((n,), dtype_from_name(entry["compute_dtype"]))
    return out


def restore(entry: Mapping[str, Any], payload: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """Rebuild a layer; an int4 payload already in this CPU's layout is used as stored (zero copy)."""
    why = unavailable_reason(device)
    if why is not None:
        raise QuantFormatError(f"native {entry['format']} payload cannot load on {device} ({why})")
    cd = dtype_from_name(entry["compute_dtype"])
    kd = _kernel_dtype(device.type, cd)
    bias = payload.get("bias")
    bias = None if bias is None else bias.to(device)
    if entry["format"] == "int8":
        return PackedInt8Linear(payload["qweight"].to(device), payload["scale"].to(device, kd), bias, cd)
    stored = entry.get("layout", PORTABLE)
    packed, sz, gs = payload["packed"], payload["scales_and_zeros"], int(entry["group_size"])
    if device.type == "cpu" and stored == cpu_int4_layout():
        return PackedInt4Linear(packed, sz.to(kd), gs, stored, bias, cd)
    return _int4_layer(unpack_int4(packed, stored), sz.to(kd), gs, bias, device, cd)


def dequantize(module: nn.Module) -> torch.Tensor:
    """The fp32 weight a layer of this backend represents (for tests and error reports)."""
    if isinstance(module, PackedInt8Linear):
        return module.qweight.float() * module.scale.float()[:, None]
    if module.layout not in CPU_LAYOUTS and module.layout != PORTABLE:
        raise QuantFormatError(f"cannot read layout {module.layout!r} back on this device")
    q = unpack_int4(module.packed.data.cpu(), module.layout).float()
    sz = module.scales_and_zeros.detach().float().cpu()  # [K/g, N, 2]
    s, z = sz[..., 0].t().repeat_interleave(module.group_size, 1), sz[..., 1].t().repeat_interleave(module.group_size, 1)
    return (q - 8.0) * s + z


__all__ = ["PackedInt4Linear", "PackedInt8Linear", "build", "cpu_int4_layout", "dequantize", "export", "expected",
           "kind", "layout_nbytes", "owns", "pack_int4", "quantize_int4_groups", "quantize_int8_rows", "restore",
           "unavailable_reason", "unpack_int4"]
