"""The vocabulary every quantization module shares: format names, compute dtypes, group sizes, dtype names.

It sits below the backends and `QuantSpec` alike (both read it), so neither has to import the other's module
to know what "int4" or "bfloat16" means.
"""

from __future__ import annotations

import torch

FORMATS: tuple[str, ...] = ("nf4", "fp4", "int4", "int8", "fp8", "bf16", "fp16", "none")
COMPUTE_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)

#: Formats that really quantize (as opposed to casting or leaving weights alone).
QUANT_FORMATS: tuple[str, ...] = ("nf4", "fp4", "int4", "int8", "fp8")

#: bitsandbytes block size used for nf4/fp4 (bnb's default; absmax is one fp32 per block).
BNB_BLOCKSIZE = 64


def effective_group_size(in_features: int, group_size: int) -> int | None:
    """The int4 group size quanto will really use for `in_features` (None = one group per row).

    Mirrors `optimum.quanto.nn.QModuleMixin`: shrink by 32 until it divides in_features, and
    give up on grouping when in_features is not larger than the requested size.
    """
    if in_features <= group_size:
        return None
    g = group_size
    while in_features % g != 0 and g > 32:
        g -= 32
    return g if in_features % g == 0 else None


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the manifest stores dtypes as plain strings."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of `dtype_name`, refusing anything that is not a torch dtype."""
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return value
