"""`QuantSpec`: what to quantize and how, validated up front so mistakes fail before any weight is touched."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch

FORMATS: tuple[str, ...] = ("nf4", "fp4", "int4", "int8", "fp8", "bf16", "fp16", "none")
COMPUTE_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)

#: Formats that really quantize (as opposed to casting or leaving weights alone).
QUANT_FORMATS: tuple[str, ...] = ("nf4", "fp4", "int4", "int8", "fp8")


def backend_names() -> tuple[str, ...]:
    """"auto" plus every registered backend (the registry imports this module, hence the late import)."""
    from .backends import REGISTRY

    return ("auto", *REGISTRY)


#: bitsandbytes block size used for nf4/fp4 (bnb's default; absmax is one fp32 per block).
BNB_BLOCKSIZE = 64


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize the `nn.Linear` layers of a module.

    `include`/`exclude` are fnmatch patterns on qualified module names relative to the module
    handed to `quantize`; an empty `include` means every Linear, and `exclude` always wins.
    `group_size` applies to int4 only (quanto shrinks it by 32 until it divides in_features,
    else falls back to one group per row). `double_quant` applies to nf4/fp4 only.
    """

    format: str = "int8"
    backend: str = "auto"
    group_size: int = 128
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    compute_dtype: torch.dtype = torch.bfloat16
    double_quant: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown quant format {self.format!r}; valid formats: {', '.join(FORMATS)}")
        if self.backend not in backend_names():
            raise ValueError(f"unknown quant backend {self.backend!r}; valid backends: {', '.join(backend_names())}")
        if self.backend != "auto":
            from .backends import REGISTRY

            implemented = REGISTRY[self.backend].formats
            if self.format not in implemented:
                raise ValueError(f"backend {self.backend!r} does not implement format {self.format!r}; "
                                 f"it implements: {', '.join(implemented)}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size <= 0 or self.group_size % 32:
            raise ValueError(f"group_size must be a positive multiple of 32, got {self.group_size!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype {self.compute_dtype!r} is not supported; valid: {', '.join(map(str, COMPUTE_DTYPES))}"
            )
        for field_name in ("include", "exclude"):
            value = getattr(self, field_name)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise ValueError(f"{field_name} must be a tuple of fnmatch pattern strings, got {value!r}")
            object.__setattr__(self, field_name, tuple(value))

    def matches(self, name: str) -> bool:
        """True when the qualified module `name` is selected by include/exclude."""
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return False
        return not self.include or any(fnmatch.fnmatchcase(name, p) for p in self.include)


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
