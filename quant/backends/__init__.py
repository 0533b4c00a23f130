"""The backend registry: name -> backend, and the one auto chain every caller uses.

Adding a format is one file in this folder (implementing `base.Backend`) plus one line below. Each backend owns
its limits (`Backend.accepts`, as torchao's `quantize_` handlers do): given a weight's shape, the chain asks the
backend it lands on, and a shape that backend refuses drops to the next smaller format (int4 -> int8) with the
same backend choice ("auto" stays "auto"), rather than to a slower kernel of the same format.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import nn

from ..errors import QuantBackendError
from . import bnb, quanto, torch_int8, torch_native
from .base import Backend, LayerKind, LayerSpec

REGISTRY: dict[str, Backend] = {
    bnb.name: bnb,
    quanto.name: quanto,
    torch_native.name: torch_native,
    torch_int8.name: torch_int8,
}

#: Formats that only cast (or keep) a weight: every device can hold them.
CAST_FORMATS: tuple[str, ...] = ("bf16", "fp16", "none")
#: The format a layer takes when the backend chosen for it refuses its shape (`Backend.accepts`).
SMALLER_FORMAT: dict[str, str] = {"int4": "int8"}


def get_backend(name: str) -> Backend:
    try:
        return REGISTRY[name]
    except KeyError:
        raise QuantBackendError(f"unknown quant backend {name!r}; valid: {', '.join(REGISTRY)}") from None


def auto_chain(fmt: str) -> list[tuple[str, str]]:
    """(backend, format) pairs backend "auto" tries for `fmt`, best first."""
    steps = [(b.auto[fmt][1], name, b.auto[fmt][0]) for name, b in REGISTRY.items() if fmt in b.auto]
    return [(name, provided) for _, name, provided in sorted(steps)]


def chain(spec: LayerSpec) -> list[tuple[str, str]]:
    return auto_chain(spec.format) if spec.backend == "auto" else [(spec.backend, spec.format)]


def usable(backend: str, fmt: str, device: torch.device) -> str | None:
    """None when `backend` can hold `fmt` on `device`; a `meta` target counts as usable (for planning)."""
    if fmt in CAST_FORMATS:
        return None
    why = REGISTRY[backend].unavailable_reason(device)
    return None if why == "cannot quantize on the meta device" else why


def candidates(spec: LayerSpec, device: torch.device | str = "cpu",
               shape: tuple[int, int] | None = None) -> Iterator[tuple[LayerSpec, str | None]]:
    """(spec resolved to one backend and format, why it cannot run or None) in the order the chain tries them.

    With a `shape`, the first usable backend is asked whether it accepts that weight; where it refuses and a
    smaller format exists, the chain goes on with that format (`SMALLER_FORMAT`) instead of the next backend.
    """
    target = torch.device(device)
    for backend, fmt in chain(spec):
        why = usable(backend, fmt, target)
        if why is None and shape is not None and fmt not in CAST_FORMATS:
            why = REGISTRY[backend].accepts(shape, fmt, target.type, replace(spec, format=fmt))
            if why is not None and fmt in SMALLER_FORMAT:
                yield replace(spec, backend=backend, format=fmt), why
                yield from candidates(replace(spec, format=SMALLER_FORMAT[fmt]), target, shape)
                return
        yield replace(spec, backend=backend, format=fmt), why


def resolve(spec: LayerSpec, device: torch.device | str = "cpu", shape: tuple[int, int] | None = None) -> LayerSpec:
    """The spec with backend "auto" turned into the backend and format that will really run on `device` (for a
    weight of `shape` [out, in] when given: see `candidates`)."""
    reasons = []
    for resolved, why in candidates(spec, device, shape):
        if why is None:
            return resolved
        reasons.append(f"{resolved.backend}/{resolved.format}: {why}")
    raise QuantBackendError(f"no backend can hold format {spec.format!r} on {torch.device(device)}: "
                            + "; ".join(reasons))


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


__all__ = ["REGISTRY", "Backend", "CAST_FORMATS", "LayerKind", "LayerSpec", "SMALLER_FORMAT", "auto_chain",
           "backend_of", "candidates", "chain", "get_backend", "is_plain_linear", "layer_kind", "resolve", "usable"]
