"""The interface every quantization backend implements: one file per backend, one line in the registry.

A backend turns one `[out, in]` weight into a layer (`build`), recognises its own layers (`owns`,
`kind`), states the exact bytes a layer will occupy from shapes alone (`layout_nbytes`, used on
`meta` models before any weight is read), states which weight shapes it accepts in a format on a device kind
(`accepts`: the auto chain asks it, and drops to a smaller format where it refuses), and writes and reads a portable payload (`export`,
`expected`, `restore`) for pre-quantized checkpoints. `auto` ranks it in the auto chain: requested
format -> (format it provides, priority); lower priority is tried first.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

Shape = tuple[int, ...]


class LayerSpec(Protocol):
    """What a backend reads of a `quant.QuantSpec` (the spec validates itself against this registry, so the
    backends name its fields rather than import it)."""

    format: str
    backend: str
    group_size: int
    compute_dtype: torch.dtype
    double_quant: bool


@dataclass(frozen=True)
class LayerKind:
    """What a layer really is after quantization (the requested format may have fallen back)."""

    format: str
    backend: str
    group_size: int | None = None


def layout(packed: int, scales: int = 0, zeros: int = 0, bias: int = 0, other: int = 0) -> dict[str, int]:
    """The byte breakdown every `layout_nbytes` returns."""
    return {"packed": packed, "scales": scales, "zeros": zeros, "bias": bias, "other": other,
            "total": packed + scales + zeros + bias + other}


def library_missing(module: str, loaded: Any, import_error: str | None) -> str | None:
    """Why an optional library cannot be used, answered without importing it.

    Planning (`presets`, `plan`, layout sizes) resolves backends but must not pay seconds for importing
    bitsandbytes or quanto (both pull in torch._dynamo); the import happens when a layer is built, and a
    library that is installed but fails to import says so there.
    """
    if loaded is not None:
        return None
    if import_error is not None:
        return f"{module.replace('optimum.', 'optimum-')} is not importable ({import_error})"
    return None if _installed(module) else f"{module.replace('optimum.', 'optimum-')} is not installed"


@functools.lru_cache(maxsize=None)
def _installed(module: str) -> bool:
    """Whether `module` can be found, asked once per process: planning the preset table asks thousands of
    times, and each `find_spec` walks sys.path (a fifth of `presets`' planning time before this cache)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """Copy a CPU tensor whose data is not `alignment`-byte aligned (safetensors mmaps only promise 8).

    Why: torch 2.13's packed-weight CPU kernels (`_weight_int8pack_mm`, used by quanto) segfault on
    weights that are 8- but not 64-aligned. Aligned tensors stay zero-copy.
    """
    if t.device.type == "cpu" and t.numel() and t.data_ptr() % alignment:
        return t.clone()
    return t


@runtime_checkable
class Backend(Protocol):
    name: str
    #: formats it implements when asked for explicitly
    formats: tuple[str, ...]
    #: requested format -> (format it provides, priority) when the backend is "auto"
    auto: Mapping[str, tuple[str, int]]

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when it can build layers on a device of this kind, else a short reason (library missing, device
        kind refused). Whether such a device is present here is not asked: a plan for a CUDA card made on a
        CPU-only machine must resolve the backends that card will run."""

    def accepts(self, shape: tuple[int, int], fmt: str, device_type: str, spec: LayerSpec) -> str | None:
        """None when it builds an [out, in] weight in `fmt` on `device_type` with the kernel it is chosen for
        (at `spec.compute_dtype` and `spec.group_size`), else why not; the chain then asks for the next smaller
        format (`quant.backends.SMALLER_FORMAT`)."""

    def owns(self, module: nn.Module) -> bool:
        """True for a layer this backend built."""

    def kind(self, module: nn.Module) -> LayerKind:
        """Format and group size of one of its layers."""

    def build(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, device: torch.device,
              spec: LayerSpec, compute_dtype: torch.dtype) -> nn.Module:
        """One frozen layer from one weight; only this weight is held in full precision meanwhile."""

    def layout_nbytes(self, n: int, k: int, bias: bool, fmt: str, spec: LayerSpec, compute_dtype: torch.dtype,
                      device_type: str) -> dict[str, int]:
        """Exact bytes of the layer `build` makes for an [n, k] weight on `device_type` (see `layout`)."""

    def export(self, module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(payload tensors, manifest fields) of one of its layers."""

    def expected(self, entry: Mapping[str, Any]) -> dict[str, tuple[Shape, torch.dtype]]:
        """component -> (shape, dtype) a valid payload for this manifest entry must have."""

    def restore(self, entry: Mapping[str, Any], payload: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
        """Rebuild a layer from a validated payload without creating a full-precision weight."""
