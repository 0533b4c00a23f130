"""optimum-quanto int4/int8/fp8 layers built one weight at a time (no QModuleMixin.from_module).

Why not `quanto.quantize()`: it cannot replace a root Linear, it allocates an empty
full-precision weight per layer (to_empty), and on reload its int4 unpack JIT-compiles a C++
extension on CPU (~26 s). Here a `QLinear` is made on `meta` and given a frozen quantized
weight directly; int4 payloads are unpacked in pure torch.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Mapping

import torch
from torch import nn

from ..int8 import SCALE_DTYPE, Int8Linear
from ..errors import QuantBackendError, QuantFormatError
from ..formats import dtype_from_name, dtype_name, effective_group_size
from .base import LayerKind, LayerSpec, Shape, element_size, layout, library_missing

name = "quanto"
formats: tuple[str, ...] = ("int4", "int8", "fp8")
auto: dict[str, tuple[str, int]] = {"nf4": ("int4", 1), "fp4": ("int4", 1), "int4": ("int4", 0),
                                    "int8": ("int8", 0), "fp8": ("fp8", 0)}
QTYPE_NAMES: dict[str, str] = {"int4": "qint4", "int8": "qint8", "fp8": "qfloat8_e4m3fn"}
_quanto: Any = None
_import_error: str | None = None


def _load() -> Any:
    """Import optimum.quanto once, when a layer is built or restored."""
    global _quanto, _import_error
    if _quanto is None and _import_error is None:
        try:
            _quanto = importlib.import_module("optimum.quanto")
        except Exception as exc:
            _import_error = f"{type(exc).__name__}: {exc}"
    if _quanto is None:
        raise QuantBackendError(f"optimum-quanto is installed but does not import ({_import_error})")
    return _quanto


def unavailable_reason(device: torch.device) -> str | None:
    """None when quanto can run on `device` (it has generic torch fallbacks for any device)."""
    missing = library_missing("optimum.quanto", _quanto, _import_error)
    if missing is not None:
        return missing
    if device.type == "meta":
        return "cannot quantize on the meta device"
    return None


def owns(module: nn.Module) -> bool:
    return any(c.__name__ == "QLinear" and c.__module__.startswith("optimum.quanto") for c in type(module).__mro__)


def tinygemm_ok(out_features: int, in_features: int, group_size: int | None, dtype: torch.dtype,
                device_type: str) -> bool:
    """Whether quanto will pick its TinyGemm int4 kernel (the CPU packer also needs N % 16 == 0)."""
    if dtype != torch.bfloat16 or group_size != 128:
        return False
    if device_type == "cpu":
        return out_features % 16 == 0
    return device_type == "cuda"


def accepts(shape: tuple[int, int], fmt: str, device_type: str, spec: LayerSpec) -> str | None:
    """int4 on cpu/cuda only where TinyGemm runs it: elsewhere quanto's generic int4 path JIT-compiles a C++
    extension (~26 s) and runs slower than int8, so the chain gives such a layer int8 instead."""
    if fmt != "int4" or device_type not in ("cpu", "cuda"):
        return None
    out_features, in_features = shape
    gs = effective_group_size(in_features, spec.group_size)
    if tinygemm_ok(out_features, in_features, gs, spec.compute_dtype, device_type):
        return None
    return (f"quanto's TinyGemm int4 kernel needs bf16 compute, groups of 128 and (on cpu) out % 16 == 0; "
            f"[{out_features}, {in_features}] in {dtype_name(spec.compute_dtype)} with group {gs} has not")


def _empty_qlinear(in_features: int, out_features: int, bias: bool, fmt: str, base_dtype: torch.dtype,
                   group_size: int | None) -> nn.Module:
    q = _load()
    layer = q.QLinear(in_features, out_features, bias, dtype=base_dtype, device="meta",
                      weights=q.qtypes[QTYPE_NAMES[fmt]])
    layer.weight_group_size = group_size
    return layer


def _finish(layer: nn.Module, qweight: torch.Tensor, bias: torch.Tensor | None, device: torch.device,
            base_dtype: torch.dtype) -> nn.Module:
    layer.weight = nn.Parameter(qweight, requires_grad=False)
    layer.bias = None if bias is None else nn.Parameter(bias.detach().to(device=device, dtype=base_dtype),
                                                        requires_grad=False)
    layer.input_scale = torch.ones((), dtype=base_dtype, device=device)
    layer.output_scale = torch.ones((), dtype=base_dtype, device=device)
    return layer


def kind(module: nn.Module) -> LayerKind:
    return LayerKind(format_of(module), name, group_size_of(module))


def build(weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, device: torch.device, spec: LayerSpec,
          compute_dtype: torch.dtype) -> nn.Module:
    """Quantize one weight into a frozen quanto QLinear on `device`, base dtype = compute_dtype."""
    q = _load()
    # optimum.quanto pulls in torch._dynamo (seconds): imported on first use, never by `import quant`.
    from optimum.quanto.tensor import AbsmaxOptimizer, MaxOptimizer, quantize_weight

    group_size = spec.group_size

    out_features, in_features = weight.shape
    qtype = q.qtypes[QTYPE_NAMES[fmt]]
    gs = effective_group_size(in_features, group_size) if fmt == "int4" else None
    layer = _empty_qlinear(in_features, out_features, bias is not None, fmt, compute_dtype, gs)
    w = weight.detach().to(device=device, dtype=compute_dtype)
    with torch.no_grad():
        if fmt == "int4":
            scale, shift = MaxOptimizer()(w, qtype=qtype, axis=0, group_size=gs)
            optimized = tinygemm_ok(out_features, in_features, gs, compute_dtype, device.type) or device.type != "cpu"
            qweight = quantize_weight(w, qtype=qtype, axis=0, scale=scale, shift=shift, group_size=gs,
                                      optimized=optimized)
        else:
            scale = AbsmaxOptimizer()(w, qtype=qtype, axis=0)
            qweight = quantize_weight(w, qtype=qtype, axis=0, scale=scale)
    return _finish(layer, qweight, bias, device, compute_dtype)


def group_size_of(layer: nn.Module) -> int | None:
    return getattr(layer, "weight_group_size", None)


def format_of(layer: nn.Module) -> str:
    name = layer.weight_qtype.name
    for fmt, qname in QTYPE_NAMES.items():
        if qname == name:
            return fmt
    raise ValueError(f"quanto qtype {name} is not one of ovis-lite's formats")


def export(layer: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Kernel-agnostic payload (quanto's own serialisation layout) plus manifest fields."""
    fmt = format_of(layer)
    w = layer.weight
    if fmt == "int4" and type(w).__name__ != "WeightQBitsTensor":
        w = w.weight_qbits_tensor()  # TinyGemm/AWQ/Marlin -> portable packing
    elif fmt != "int4" and type(w).__name__ != "WeightQBytesTensor":
        w = w.weight_qbytes_tensor()  # Marlin fp8 (CUDA) -> portable layout
    tensors: dict[str, torch.Tensor] = {"qweight": w._data._data if fmt == "int4" else w._data, "scale": w._scale}
    if fmt == "int4":
        tensors["shift"] = w._shift
    if layer.bias is not None:
        tensors["bias"] = layer.bias.data
    fields = {"format": fmt, "group_size": group_size_of(layer), "dtype": dtype_name(w._scale.dtype)}
    return tensors, fields


def _unpack_uint4(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """Inverse of quanto's `pack_weights` for 4 bits: row r holds rows r and r+R in its low/high nibble."""
    return torch.cat([packed & 0x0F, (packed >> 4) & 0x0F])[:rows]


def layout_nbytes(n: int, k: int, bias: bool, fmt: str, spec: LayerSpec, compute_dtype: torch.dtype,
                  device_type: str) -> dict[str, int]:
    """int8/fp8: 1-byte [N, K] + scale [N, 1] + two scalar activation scales. int4: uint4 pairs, scale
    and shift per group (TinyGemm interleaves them [K/128, N, 2]; same bytes), or per row."""
    elt = element_size(compute_dtype)
    bias_bytes = n * elt if bias else 0
    act_scales = 2 * elt
    if fmt in ("int8", "fp8"):
        return layout(n * k, scales=n * elt, bias=bias_bytes, other=act_scales)
    gs = effective_group_size(k, spec.group_size)
    if gs is not None and tinygemm_ok(n, k, gs, compute_dtype, device_type):
        groups = n * (k // gs)
        return layout(n * k // 2, scales=groups * elt, zeros=groups * elt, bias=bias_bytes, other=act_scales)
    rows, cols = (n, k) if gs is None else (n * k // gs, gs)
    return layout(math.ceil(rows / 2) * cols, scales=rows * elt, zeros=rows * elt, bias=bias_bytes, other=act_scales)


def expected(entry: Mapping[str, Any]) -> dict[str, tuple[Shape, torch.dtype]]:
    n, k = entry["shape"]
    fmt = entry["format"]
    dt = dtype_from_name(entry["dtype"])
    if fmt == "int4":
        gs = entry.get("group_size")
        rows, cols = (n * k // gs, gs) if gs else (n, k)
        out: dict[str, tuple[Shape, torch.dtype]] = {"qweight": ((math.ceil(rows / 2), cols), torch.uint8),
                                                     "scale": ((rows, 1), dt), "shift": ((rows, 1), dt)}
    else:
        out = {"qweight": ((n, k), torch.int8 if fmt == "int8" else torch.float8_e4m3fn), "scale": ((n, 1), dt)}
    if entry["bias"]:
        out["bias"] = ((n,), dt)
    return out


def restore(entry: Mapping[str, Any], tensors: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """Rebuild a frozen QLinear from a payload, picking the device's best kernel, no fp weight.

    Where quanto is missing, an int8 payload becomes a torch `Int8Linear` (the same math)."""
    why = unavailable_reason(device)
    if why is not None:
        if entry["format"] == "int8":
            dt = dtype_from_name(entry["dtype"])
            return Int8Linear(tensors["qweight"].to(device), tensors["scale"].reshape(-1).to(device, SCALE_DTYPE),
                              None if "bias" not in tensors else tensors["bias"].to(device), dt)
        raise QuantFormatError(f"quanto {entry['format']} payload cannot load on {device} ({why}); "
                               "install optimum-quanto or re-export with format int8")
    q = _load()
    # optimum.quanto pulls in torch._dynamo (seconds): imported on first use, never by `import quant`.
    from optimum.quanto.tensor import WeightQBitsTensor, WeightQBytesTensor
    from optimum.quanto.tensor.grouped import grouped_shape

    fmt = entry["format"]
    out_features, in_features = entry["shape"]
    base_dtype = dtype_from_name(entry["dtype"])
    gs = entry.get("group_size")
    qtype = q.qtypes[QTYPE_NAMES[fmt]]
    layer = _empty_qlinear(in_features, out_features, "bias" in tensors, fmt, base_dtype, gs)
    size, stride = torch.Size([out_features, in_features]), (in_features, 1)
    data = tensors["qweight"].to(device)
    scale = tensors["scale"].to(device)
    if fmt == "int4":
        rows = grouped_shape(size, 0, gs)[0] if gs else out_features
        unpacked = _unpack_uint4(data, rows)
        shift = tensors["shift"].to(device)
        if device.type == "cpu" and not tinygemm_ok(out_features, in_features, gs, base_dtype, "cpu"):
            qweight = WeightQBitsTensor(qtype, 0, gs, size, stride, unpacked, scale, shift)
        else:
            qweight = WeightQBitsTensor.create(qtype, 0, gs, size, stride, unpacked, scale, shift)
    else:
        qweight = WeightQBytesTensor.create(qtype, 0, size, stride, data, scale, None)
    return _finish(layer, qweight, tensors.get("bias"), device, base_dtype)
