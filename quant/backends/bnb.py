"""bitsandbytes nf4/fp4 layers, imported lazily so `import quant` stays fast and works without bnb.

Every layer gets `support_avx512bf16_for_cpu = False`: on AVX512-BF16 CPUs bnb otherwise
repacks the weight in place on the first forward and then corrupts non-double-quant layers
when they are saved or moved (docs/deps.md §3).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import math
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import QuantBackendError, QuantFormatError
from ..formats import BNB_BLOCKSIZE, dtype_from_name, dtype_name
from .base import LayerKind, LayerSpec, Shape, element_size, layout, library_missing

name = "bnb"
formats: tuple[str, ...] = ("nf4", "fp4")
auto: dict[str, tuple[str, int]] = {"nf4": ("nf4", 0), "fp4": ("fp4", 0)}
SUPPORTED_DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda", "xpu")
_bnb: Any = None
_import_error: str | None = None


def quiet_import_logs() -> None:
    """bnb's CPU backend logs a "kernels-community" warning when imported (by us, or by diffusers'
    quantizers) about an optional package nothing here needs; it would break one-line error output."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _load() -> Any:
    """Import bitsandbytes once (when a layer is built), swallowing its harmless 'kernels-community' chatter."""
    global _bnb, _import_error
    if _bnb is None and _import_error is None:
        quiet_import_logs()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                _bnb = importlib.import_module("bitsandbytes")
        except Exception as exc:  # ImportError, or a broken native library
            _import_error = f"{type(exc).__name__}: {exc}"
    if _bnb is None:
        raise QuantBackendError(f"bitsandbytes is installed but does not import ({_import_error})")
    return _bnb


def unavailable_reason(device: torch.device) -> str | None:
    """None when bnb 4-bit can run on `device`, else a short reason."""
    if device.type not in SUPPORTED_DEVICE_TYPES:
        return f"bitsandbytes 4-bit does not run on {device.type}"
    return library_missing("bitsandbytes", _bnb, _import_error)


def accepts(shape: tuple[int, int], fmt: str, device_type: str, spec: LayerSpec) -> str | None:
    """Any shape: bnb quantizes the flattened weight in blocks of `BNB_BLOCKSIZE` (a short last block is kept)."""
    return None


def owns(module: nn.Module) -> bool:
    """True for a bnb Linear4bit (checked without importing bnb)."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def _empty_layer(in_features: int, out_features: int, bias: bool, fmt: str, compute_dtype: torch.dtype,
                 double_quant: bool) -> nn.Module:
    bnb = _load()
    with contextlib.redirect_stderr(io.StringIO()):
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                                  compress_statistics=double_quant, quant_type=fmt, device="meta")
    layer.support_avx512bf16_for_cpu = False
    return layer


def kind(module: nn.Module) -> LayerKind:
    return LayerKind(module.weight.quant_type, name)


def build(weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, device: torch.device, spec: LayerSpec,
          compute_dtype: torch.dtype) -> nn.Module:
    """Quantize one weight on `device` into a Linear4bit (the fp copy lives only during the call)."""
    bnb = _load()
    double_quant = spec.double_quant
    out_features, in_features = weight.shape
    layer = _empty_layer(in_features, out_features, bias is not None, fmt, compute_dtype, double_quant)
    w = weight.detach().to(device=device, dtype=compute_dtype)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=BNB_BLOCKSIZE, compress_statistics=double_quant,
                                     quant_type=fmt, module=layer)._quantize(device)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(device=device, dtype=compute_dtype), requires_grad=False)
    layer.support_avx512bf16_for_cpu = False
    return layer


def export(layer: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Payload tensors and manifest fields of one Linear4bit, in bnb's portable packing."""
    qs = layer.weight.quant_state
    if getattr(qs, "packing_format_for_cpu", False):
        raise RuntimeError("bnb layer was repacked for the CPU kernel; set support_avx512bf16_for_cpu=False before use")
    tensors = {"qweight": layer.weight.data, "absmax": qs.absmax, "quant_map": qs.code}
    fields: dict[str, Any] = {"format": qs.quant_type, "blocksize": qs.blocksize, "double_quant": qs.nested,
                              "dtype": dtype_name(qs.dtype), "compute_dtype": dtype_name(layer.compute_dtype)}
    if qs.nested:
        tensors["nested_absmax"] = qs.state2.absmax
        tensors["nested_quant_map"] = qs.state2.code
        tensors["nested_offset"] = qs.offset.reshape(()).to(torch.float32)
        fields["nested_blocksize"] = qs.state2.blocksize
        fields["nested_dtype"] = dtype_name(qs.state2.dtype)
    if layer.bias is not None:
        tensors["bias"] = layer.bias.data
    return tensors, fields


def layout_nbytes(n: int, k: int, bias: bool, fmt: str, spec: LayerSpec, compute_dtype: torch.dtype,
                  device_type: str) -> dict[str, int]:
    """uint4 pairs of the flattened weight + fp32 absmax per 64-block + a 16-entry fp32 code; with double
    quant absmax is uint8 plus nested fp32 absmax per 256 blocks, a 256-entry code and an fp32 offset."""
    numel = n * k
    blocks = math.ceil(numel / BNB_BLOCKSIZE)
    bias_bytes = n * element_size(compute_dtype) if bias else 0
    if spec.double_quant:
        return layout(math.ceil(numel / 2), scales=blocks + math.ceil(blocks / 256) * 4 + 4, bias=bias_bytes,
                      other=16 * 4 + 256 * 4)
    return layout(math.ceil(numel / 2), scales=blocks * 4, bias=bias_bytes, other=16 * 4)


def expected(entry: Mapping[str, Any]) -> dict[str, tuple[Shape, torch.dtype]]:
    n, k = entry["shape"]
    blocks = math.ceil(n * k / int(entry["blocksize"]))
    out: dict[str, tuple[Shape, torch.dtype]] = {"qweight": ((math.ceil(n * k / 2), 1), torch.uint8),
                                                 "quant_map": ((16,), torch.float32)}
    if entry["double_quant"]:
        out["absmax"] = ((blocks,), torch.uint8)
        out["nested_absmax"] = ((math.ceil(blocks / int(entry["nested_blocksize"])),), torch.float32)
        out["nested_quant_map"] = ((256,), torch.float32)
        out["nested_offset"] = ((), torch.float32)
    else:
        out["absmax"] = ((blocks,), torch.float32)
    if entry["bias"]:
        out["bias"] = ((n,), dtype_from_name(entry["compute_dtype"]))
    return out


def restore(entry: Mapping[str, Any], tensors: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """Rebuild a Linear4bit from an exported payload without any full-precision weight."""
    why = unavailable_reason(device)
    if why is not None:
        raise QuantFormatError(f"bnb {entry['format']} payload cannot load on {device} ({why}); load it where "
                               "bitsandbytes runs (cpu/cuda/xpu) or re-export with format int4 (quanto)")
    bnb = _load()
    out_features, in_features = entry["shape"]
    compute_dtype = dtype_from_name(entry["compute_dtype"])
    layer = _empty_layer(in_features, out_features, "bias" in tensors, entry["format"], compute_dtype,
                         bool(entry["double_quant"]))
    qs: dict[str, Any] = {"quant_type": entry["format"], "blocksize": int(entry["blocksize"]), "dtype": entry["dtype"],
                          "shape": [out_features, in_features], "absmax": tensors["absmax"],
                          "quant_map": tensors["quant_map"]}
    if entry["double_quant"]:
        qs.update(nested_absmax=tensors["nested_absmax"], nested_quant_map=tensors["nested_quant_map"],
                  nested_offset=tensors["nested_offset"], nested_blocksize=int(entry["nested_blocksize"]),
                  nested_dtype=entry["nested_dtype"])
    layer.weight = bnb.nn.Params4bit.from_prequantized(tensors["qweight"], qs, requires_grad=False, device=device,
                                                       module=layer)
    if "bias" in tensors:
        layer.bias = nn.Parameter(tensors["bias"].to(device=device, dtype=compute_dtype), requires_grad=False)
    layer.support_avx512bf16_for_cpu = False
    return layer
