"""Build one quantized linear from one weight tensor: the unit a streaming loader calls.

Backend "auto" walks `AUTO_CHAIN` (e.g. nf4: bnb -> quanto int4 -> torch int8) and takes the
first backend that is installed, accepts the device and succeeds; an explicit backend never
falls back and raises `QuantBackendError` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import bnb_backend, quanto_backend
from .errors import QuantBackendError
from .int8 import Int8Embedding, Int8Linear
from .spec import AUTO_CHAIN, QuantSpec, effective_group_size

CAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class LayerKind:
    """What a layer really is after quantization (the requested format may have fallen back)."""

    format: str
    backend: str
    group_size: int | None = None


def _unavailable(backend: str, device: torch.device) -> str | None:
    if backend == "bnb":
        return bnb_backend.unavailable_reason(device)
    if backend == "quanto":
        return quanto_backend.unavailable_reason(device)
    return "cannot quantize on the meta device" if device.type == "meta" else None


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device,
                  dtype: torch.dtype | None) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().to(device=device, dtype=dtype), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype), requires_grad=False)
    return layer


def _build(backend: str, fmt: str, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device,
           spec: QuantSpec, compute_dtype: torch.dtype) -> nn.Module:
    if backend == "bnb":
        return bnb_backend.build(weight, bias, fmt, device, compute_dtype, spec.double_quant)
    if backend == "quanto":
        return quanto_backend.build(weight, bias, fmt, device, compute_dtype, spec.group_size)
    if fmt == "int8":
        return Int8Linear.from_weight(weight, bias, device, compute_dtype)
    return _plain_linear(weight, bias, device, CAST_DTYPES.get(fmt))


def resolve_backend(spec: QuantSpec, device: torch.device | str = "cpu") -> tuple[str, str]:
    """(backend, format) that will be used on `device`: the first usable step of the auto chain."""
    target = torch.device(device)
    chain = AUTO_CHAIN[spec.format] if spec.backend == "auto" else ((spec.backend, spec.format),)
    for backend, fmt in chain:
        if fmt in ("bf16", "fp16", "none") or _unavailable(backend, target) in (None, "cannot quantize on the meta device"):
            return backend, fmt
    raise QuantBackendError(f"no backend can hold format {spec.format!r} on {target}")


def quantize_linear_from_weight(weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec,
                                device: torch.device | str | None = None,
                                compute_dtype: torch.dtype | None = None) -> nn.Module:
    """One quantized layer from one [out, in] weight (+bias), e.g. fresh from a mmapped safetensors.

    Only this weight is ever held in full precision (and only for the duration of the call).
    `device` defaults to the weight's device; `compute_dtype` defaults to `spec.compute_dtype`.
    Format "none" returns a plain Linear holding the weight as given.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    target = torch.device(device) if device is not None else weight.device
    if weight.device.type == "meta" and spec.format != "none":
        raise ValueError("weight is on the meta device: there is nothing to quantize; use restore_quantized "
                         "for pre-quantized checkpoints")
    cd = compute_dtype or spec.compute_dtype
    chain = AUTO_CHAIN[spec.format] if spec.backend == "auto" else ((spec.backend, spec.format),)
    reasons: list[str] = []
    for backend, fmt in chain:
        why = _unavailable(backend, target) if fmt not in ("bf16", "fp16", "none") else None
        if why is None:
            try:
                return _build(backend, fmt, weight, bias, target, spec, cd)
            except (RuntimeError, NotImplementedError, TypeError) as exc:
                if spec.backend != "auto":
                    raise
                why = f"{type(exc).__name__}: {exc}"
        reasons.append(f"{backend}/{fmt}: {why}")
    raise QuantBackendError(f"no backend could build format {spec.format!r} on {target}: " + "; ".join(reasons))


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The format/backend of a layer built by this package, or None for anything else."""
    if isinstance(module, (Int8Linear, Int8Embedding)):
        return LayerKind("int8", "torch")
    if quanto_backend.owns(module):
        fmt = quanto_backend.format_of(module)
        return LayerKind(fmt, "quanto", quanto_backend.group_size_of(module))
    if bnb_backend.owns(module):
        return LayerKind(module.weight.quant_type, "bnb")
    if type(module) is nn.Linear and module.weight.dtype in (torch.bfloat16, torch.float16):
        return LayerKind("bf16" if module.weight.dtype == torch.bfloat16 else "fp16", "torch")
    return None


def planned_group_size(spec: QuantSpec, fmt: str, in_features: int) -> int | None:
    """Group size a layer of `fmt` will get (int4 only)."""
    return effective_group_size(in_features, spec.group_size) if fmt == "int4" else None
