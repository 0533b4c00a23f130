"""The backend registry: name -> backend, and the one auto chain every caller uses.

Adding a format is one file in this folder (implementing `base.Backend`) plus one line below.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..errors import QuantBackendError
from ..spec import QuantSpec
from . import bnb, quanto, torch_int8, torch_native
from .base import Backend, LayerKind

REGISTRY: dict[str, Backend] = {
    bnb.name: bnb,
    quanto.name: quanto,
    torch_native.name: torch_native,
    torch_int8.name: torch_int8,
}

#: Formats that only cast (or keep) a weight: every device can hold them.
CAST_FORMATS: tuple[str, ...] = ("bf16", "fp16", "none")


def get_backend(name: str) -> Backend:
    try:
        return REGISTRY[name]
    except KeyError:
        raise QuantBackendError(f"unknown quant backend {name!r}; valid: {', '.join(REGISTRY)}") from None


def auto_chain(fmt: str) -> list[tuple[str, str]]:
    """(backend, format) pairs backend "auto" tries for `fmt`, best first."""
    steps = [(b.auto[fmt][1], name, b.auto[fmt][0]) for name, b in REGISTRY.items() if fmt in b.auto]
    return [(name, provided) for _, name, provided in sorted(steps)]


def chain(spec: QuantSpec) -> list[tuple[str, str]]:
    return auto_chain(spec.format) if spec.backend == "auto" else [(spec.backend, spec.format)]


def usable(backend: str, fmt: str, device: torch.device) -> str | None:
    """None when `backend` can hold `fmt` on `device`; a `meta` target counts as usable (for planning)."""
    if fmt in CAST_FORMATS:
        return None
    why = REGISTRY[backend].unavailable_reason(device)
    return None if why == "cannot quantize on the meta device" else why


def resolve(spec: QuantSpec, device: torch.device | str = "cpu") -> QuantSpec:
    """The spec with backend "auto" turned into the backend and format that will really run on `device`."""
    target = torch.device(device)
    for backend, fmt in chain(spec):
        if usable(backend, fmt, target) is None:
            return replace(spec, backend=backend, format=fmt)
    raise QuantBackendError(f"no backend can hold format {spec.format!r} on {target}")


def backend_of(module: nn.Module) -> Backend | None:
    for backend in REGISTRY.values():
        if backend.owns(module):
            return backend
    return None


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The format/backend of a layer built by this package (or a cast Linear), None for anything else."""
    backend = backend_of(module)
    if backend is not None:
        return backend.kind(module)
    if type(module) is nn.Linear and module.weight.dtype in (torch.bfloat16, torch.float16):
        return LayerKind("bf16" if module.weight.dtype == torch.bfloat16 else "fp16", torch_int8.name)
    return None


def is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear (or subclass) that no backend has quantized yet."""
    return isinstance(module, nn.Linear) and backend_of(module) is None


__all__ = ["REGISTRY", "Backend", "CAST_FORMATS", "LayerKind", "auto_chain", "backend_of", "chain", "get_backend",
           "is_plain_linear", "layer_kind", "resolve", "usable"]
