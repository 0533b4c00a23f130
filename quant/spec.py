"""`QuantSpec`: what to quantize and how, validated up front so mistakes fail before any weight is touched.

The spec is checked against the backend registry (names, and the formats an explicit backend implements), so it
sits above `quant.backends`; the backends read only `quant.formats` and the `LayerSpec` shape of a spec.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch

from .backends import REGISTRY
from .formats import COMPUTE_DTYPES, FORMATS


def backend_names() -> tuple[str, ...]:
    """"auto" plus every registered backend."""
    return ("auto", *REGISTRY)


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
