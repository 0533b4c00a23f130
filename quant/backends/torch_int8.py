"""Pure-torch int8 weight-only layers (and plain bf16/fp16 casts): the backend that runs on any device.

It is the last step of every auto chain, so a format always finds a home even without
bitsandbytes or optimum-quanto installed.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..int8 import SCALE_DTYPE, Int8Embedding, Int8Linear
from ..formats import dtype_from_name, dtype_name
from .base import LayerKind, LayerSpec, Shape, element_size, layout

name = "torch"
formats: tuple[str, ...] = ("int8", "bf16", "fp16", "none")
auto: dict[str, tuple[str, int]] = {
    "nf4": ("int8", 9), "fp4": ("int8", 9), "int4": ("int8", 9), "int8": ("int8", 9), "fp8": ("int8", 9),
    "bf16": ("bf16", 0), "fp16": ("fp16", 0), "none": ("none", 0),
}
CAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def unavailable_reason(device: torch.device) -> str | None:
    return "cannot quantize on the meta device" if device.type == "meta" else None


def accepts(shape: tuple[int, int], fmt: str, device_type: str, spec: LayerSpec) -> str | None:
    """Any shape: a row-wise int8 Linear (or a cast) holds every weight."""
    return None


def owns(module: nn.Module) -> bool:
    return isinstance(module, (Int8Linear, Int8Embedding))


def kind(module: nn.Module) -> LayerKind:
    return LayerKind("int8", name)


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device,
                 dtype: torch.dtype | None) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().to(device=device, dtype=dtype), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype), requires_grad=False)
    return layer


def build(weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, device: torch.device, spec: LayerSpec,
          compute_dtype: torch.dtype) -> nn.Module:
    if fmt == "int8":
        return Int8Linear.from_weight(weight, bias, device, compute_dtype)
    return plain_linear(weight, bias, device, CAST_DTYPES.get(fmt))


def layout_nbytes(n: int, k: int, bias: bool, fmt: str, spec: LayerSpec, compute_dtype: torch.dtype,
                  device_type: str) -> dict[str, int]:
    """int8 [N, K] + fp32 scale [N]; a cast (or "none", stored in `compute_dtype`) is N*K elements."""
    if fmt in ("none", "bf16", "fp16"):
        wd = CAST_DTYPES.get(fmt, compute_dtype)
        return layout(n * k * element_size(wd), bias=n * element_size(wd) if bias else 0)
    return layout(n * k, scales=n * element_size(SCALE_DTYPE), bias=n * element_size(compute_dtype) if bias else 0)


def export(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"qweight": module.qweight, "scale": module.scale.to(SCALE_DTYPE)}
    if isinstance(module, Int8Embedding):
        return tensors, {"kind": "embedding", "format": "int8", "shape": [module.num_embeddings, module.embedding_dim],
                         "compute_dtype": dtype_name(module.compute_dtype), "padding_idx": module.padding_idx}
    if module.bias is not None:
        tensors["bias"] = module.bias.data
    return tensors, {"format": "int8", "compute_dtype": dtype_name(module.compute_dtype)}


def expected(entry: Mapping[str, Any]) -> dict[str, tuple[Shape, torch.dtype]]:
    n, k = entry["shape"]
    if entry.get("kind") == "embedding":
        return {"qweight": ((n, k), torch.int8), "scale": ((n,), SCALE_DTYPE)}
    out: dict[str, tuple[Shape, torch.dtype]] = {}
    if not entry.get("tied_to"):
        out = {"qweight": ((n, k), torch.int8), "scale": ((n,), SCALE_DTYPE)}
    if entry["bias"]:
        out["bias"] = ((n,), dtype_from_name(entry["compute_dtype"]))
    return out


def restore(entry: Mapping[str, Any], payload: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    cd = dtype_from_name(entry["compute_dtype"])
    p = {c: t.to(device) for c, t in payload.items()}
    if entry["kind"] == "embedding":
        return Int8Embedding(p["qweight"], p["scale"], entry.get("padding_idx"), cd)
    return Int8Linear(p["qweight"], p["scale"], p.get("bias"), cd)
