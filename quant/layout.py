"""Exact bytes a quantized layer will occupy, computed from shapes alone (works on `meta` models).

Mirrors the layouts the backends really allocate (checked against `module_nbytes` in the tests):
- torch int8: int8 [N, K] + fp32 scale [N].
- quanto int8/fp8: 1-byte [N, K] + scale [N, 1] in the base dtype + two scalar activation scales.
- quanto int4: uint4 pairs; scale and shift per group (TinyGemm stores them interleaved
  [K/128, N, 2]; same byte count), or per row when no group size divides K.
- bnb nf4/fp4: uint4 pairs of the flattened weight + fp32 absmax per 64-block + 16-entry fp32
  code; with double quant absmax is uint8 plus nested fp32 absmax per 256 blocks, a 256-entry
  code and an fp32 offset.
"""

from __future__ import annotations

import math

import torch

from .int8 import SCALE_DTYPE
from .linear import CAST_DTYPES, resolve_backend
from .quanto_backend import tinygemm_ok
from .spec import BNB_BLOCKSIZE, QuantSpec, effective_group_size


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _result(packed: int, scales: int = 0, zeros: int = 0, bias: int = 0, other: int = 0) -> dict[str, int]:
    return {"packed": packed, "scales": scales, "zeros": zeros, "bias": bias, "other": other,
            "total": packed + scales + zeros + bias + other}


def layout_nbytes(shape_out: int, shape_in: int, bias: bool, spec: QuantSpec, dtype: torch.dtype | None = None,
                  device: torch.device | str = "cpu") -> dict[str, int]:
    """Per-component bytes of the layer `quantize_linear_from_weight` builds for an [out, in] weight.

    `dtype` is the compute/base dtype (default `spec.compute_dtype`); for format "none" it is the
    dtype the weight is stored in. Backend "auto" resolves as it would on `device`. Keys:
    packed (weight payload), scales, zeros (quanto int4 shift), bias, other (quanto activation
    scales, bnb code tables and offset), total.
    """
    n, k = int(shape_out), int(shape_in)
    cd = dtype or spec.compute_dtype
    backend, fmt = resolve_backend(spec, device)
    if fmt in ("none", "bf16", "fp16"):
        wd = CAST_DTYPES.get(fmt, cd)
        return _result(n * k * _elt(wd), bias=n * _elt(wd) if bias else 0)
    bias_bytes = n * _elt(cd) if bias else 0
    if backend == "torch":
        return _result(n * k, scales=n * _elt(SCALE_DTYPE), bias=bias_bytes)
    if backend == "bnb":
        numel = n * k
        blocks = math.ceil(numel / BNB_BLOCKSIZE)
        if spec.double_quant:
            return _result(math.ceil(numel / 2), scales=blocks + math.ceil(blocks / 256) * 4 + 4, bias=bias_bytes,
                           other=16 * 4 + 256 * 4)
        return _result(math.ceil(numel / 2), scales=blocks * 4, bias=bias_bytes, other=16 * 4)
    act_scales = 2 * _elt(cd)
    if fmt in ("int8", "fp8"):
        return _result(n * k, scales=n * _elt(cd), bias=bias_bytes, other=act_scales)
    gs = effective_group_size(k, spec.group_size)
    if gs is not None and tinygemm_ok(n, k, gs, cd, torch.device(device).type):
        groups = n * (k // gs)
        return _result(n * k // 2, scales=groups * _elt(cd), zeros=groups * _elt(cd), bias=bias_bytes, other=act_scales)
    if gs is None:
        rows, cols = n, k
    else:
        rows, cols = n * k // gs, gs
    return _result(math.ceil(rows / 2) * cols, scales=rows * _elt(cd), zeros=rows * _elt(cd), bias=bias_bytes,
                   other=act_scales)


def embedding_layout_nbytes(num_embeddings: int, embedding_dim: int) -> dict[str, int]:
    """Bytes of an `Int8Embedding` (a tied Int8Linear head adds nothing)."""
    return _result(num_embeddings * embedding_dim, scales=num_embeddings * _elt(SCALE_DTYPE))
