"""Exact bytes a quantized layer will occupy, computed from shapes alone (works on `meta` models).

Each backend states its own layout (`Backend.layout_nbytes`); this module resolves which backend
a spec lands on and asks it. The tests check every layout against `module_nbytes` of a real layer.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .backends import REGISTRY, resolve
from .backends.base import element_size, layout
from .int8 import SCALE_DTYPE
from .formats import COMPUTE_DTYPES
from .spec import QuantSpec


def layout_nbytes(shape_out: int, shape_in: int, bias: bool, spec: QuantSpec, dtype: torch.dtype | None = None,
                  device: torch.device | str = "cpu") -> dict[str, int]:
    """Per-component bytes of the layer `quantize_linear_from_weight` builds for an [out, in] weight.

    `dtype` is the compute/base dtype (default `spec.compute_dtype`); for format "none" it is the
    dtype the weight is stored in. Backend "auto" resolves as it would on `device`. Keys:
    packed (weight payload), scales, zeros (quanto int4 shift), bias, other (quanto activation
    scales, bnb code tables and offset), total.
    """
    target = torch.device(device)
    cd = dtype or spec.compute_dtype
    resolved = resolve(replace(spec, compute_dtype=cd) if cd in COMPUTE_DTYPES else spec, target,
                       (int(shape_out), int(shape_in)))
    return REGISTRY[resolved.backend].layout_nbytes(int(shape_out), int(shape_in), bias, resolved.format, spec,
                                                   cd, target.type)


def embedding_layout_nbytes(num_embeddings: int, embedding_dim: int) -> dict[str, int]:
    """Bytes of an `Int8Embedding` (a tied Int8Linear head adds nothing)."""
    return layout(num_embeddings * embedding_dim, scales=num_embeddings * element_size(SCALE_DTYPE))
