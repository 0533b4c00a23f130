"""bf16 storage, fp32 compute: keep a module tree's weights in bf16 (the planned memory) but run every
layer in fp32, casting each weight for the duration of its own call.

Why: on a CPU without native bf16 (AVX2-only x86, for one) torch emulates bf16 GEMMs 10-90x slower
than fp32, while casting one layer's weight per call costs a fraction of the GEMM (measured on an
AMD EPYC with the AVX2 code path: 0.6-0.95 of the fp32 GEMM rate, against 0.1-0.2 for bf16 compute).

Model-agnostic and removable (`use_fp32_compute(root).remove()`): one hook named `HOOK_NAME` per module in its
`offload.registry.HookRegistry`, chosen by what the module holds:
- a module with a `compute_dtype` attribute (this package's quantized layers, the VTE tables) gets
  `compute_dtype = float32`; it reads its own payload in blocks, so no full fp32 copy is made;
- an `nn.Embedding` looks rows up in bf16 and returns them in fp32 (a full cast of a vocab table per
  call would cost more than the lookup);
- any other module that directly owns bf16/fp16 parameters (Linear, Conv, LayerNorm, GroupNorm, an
  RMSNorm's scale, a block's modulation table) sees fp32 copies of them during its forward only, and
  its floating inputs cast to fp32; except that an nn.Linear called on <= `SMALL_ROWS` rows (decode)
  runs its memory-bound bf16 GEMV as stored and returns fp32;
- layers a quantization backend built (quanto, bnb, ...) keep their own kernel and dtype: their inputs are cast
  to it and their outputs back to fp32, so the tree around them stays fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from offload.registry import COMPUTE, ModuleHook, add_hook, remove_hook
from quant.backends import backend_of

LOW_PRECISION: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
#: The name these hooks have in each module's registry.
HOOK_NAME = "cpu.fp32_compute"
#: A Linear called on at most this many rows (a decode step) runs its bf16 GEMV as stored and returns fp32:
#: it is memory-bound, reads half the bytes and needs no cast (AMD EPYC, AVX2 path, 6144x2048: 5x faster
#: than casting the weight at 1-4 rows, still faster at 16, slower from ~64).
SMALL_ROWS = 16


def _to_fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype in LOW_PRECISION:
        return value.float()
    if isinstance(value, tuple):
        return tuple(_to_fp32(v) for v in value)
    if isinstance(value, list):
        return [_to_fp32(v) for v in value]
    return value


def _own_low_params(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters(recurse=False) if p is not None and p.dtype in LOW_PRECISION]


def _rows(args: tuple[Any, ...]) -> int | None:
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    return x.numel() // max(1, x.shape[-1])


class ComputeDtypeHook(ModuleHook):
    """A layer that reads its own payload in blocks (this package's quantized layers, the VTE tables): its
    `compute_dtype` becomes fp32 while attached (None = "the weight's dtype")."""

    order = COMPUTE

    def __init__(self) -> None:
        self.saved: torch.dtype | None = None

    def attach(self, module: nn.Module) -> None:
        self.saved = module.compute_dtype
        module.compute_dtype = torch.float32

    def detach(self, module: nn.Module) -> None:
        module.compute_dtype = self.saved


class Fp32OutputHook(ModuleHook):
    """An embedding looks rows up as stored and returns fp32 (a full cast of a vocab table per call would cost
    more than the lookup); a backend's layer (quanto, bnb) also gets its input in its own dtype first (they
    compute in their own base dtype and may refuse fp32 inputs)."""

    order = COMPUTE

    def __init__(self, cast_input: bool) -> None:
        self.cast_input = cast_input

    def pre_forward(self, module: nn.Module, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if not self.cast_input:
            return args, kwargs
        dtype = getattr(module, "compute_dtype", None) or getattr(getattr(module, "weight", None), "dtype", None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype == torch.float32:
            return args, kwargs
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args), kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        return _to_fp32(output)


class ParamSwapHook(ModuleHook):
    """A module that owns bf16/fp16 parameters sees fp32 copies of them during its own forward, and fp32 inputs;
    a plain Linear on <= `SMALL_ROWS` rows runs its GEMV as stored and returns fp32."""

    order = COMPUTE

    def __init__(self, names: list[str], gemv_ok: bool) -> None:
        self.names, self.gemv_ok = names, gemv_ok

    def forward(self, module: nn.Module, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        rows = _rows(args) if self.gemv_ok else None
        if rows is not None and rows <= SMALL_ROWS and args[0].is_floating_point():
            return _to_fp32(inner(args[0].to(module.weight.dtype), *args[1:], **kwargs))  # see SMALL_ROWS
        originals = {n: module._parameters[n] for n in self.names}  # a re-entered module stacks on this frame
        for n, p in originals.items():
            if p is not None and p.dtype in LOW_PRECISION:
                module._parameters[n] = p.detach().float()  # type: ignore[assignment]  # for this call only
        try:
            return inner(*_to_fp32(args), **{k: _to_fp32(v) for k, v in kwargs.items()})
        finally:
            for n, p in originals.items():
                module._parameters[n] = p


def hook_for(module: nn.Module) -> ModuleHook | None:
    """The fp32-compute hook `module` needs, by what it holds; None when it needs none."""
    if hasattr(module, "compute_dtype"):
        dtype = module.compute_dtype
        return ComputeDtypeHook() if dtype is None or dtype in LOW_PRECISION else None
    if backend_of(module) is not None:  # it runs its own kernel in its own dtype; the tree around it sees fp32
        return Fp32OutputHook(cast_input=True)
    if isinstance(module, nn.Embedding):
        return Fp32OutputHook(cast_input=False) if module.weight.dtype in LOW_PRECISION else None
    names = _own_low_params(module)
    return ParamSwapHook(names, type(module) is nn.Linear) if names else None


@dataclass
class Fp32Compute:
    """The modules `use_fp32_compute` hooked, so `remove()` takes exactly those hooks off again."""

    modules: list[nn.Module] = field(default_factory=list)
    swapped: int = 0  # modules whose parameters are swapped for fp32 copies per call

    def remove(self) -> None:
        for module in self.modules:
            remove_hook(module, HOOK_NAME)
        self.modules.clear()

    def __enter__(self) -> "Fp32Compute":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def use_fp32_compute(root: nn.Module) -> Fp32Compute:
    """Make every layer under `root` compute in fp32 while its weights stay as stored (see module doc)."""
    state = Fp32Compute()
    for module in root.modules():
        hook = hook_for(module)
        if hook is None:
            continue
        add_hook(module, HOOK_NAME, hook)
        state.modules.append(module)
        state.swapped += isinstance(hook, ParamSwapHook)
    return state


__all__ = ["HOOK_NAME", "LOW_PRECISION", "SMALL_ROWS", "Fp32Compute", "hook_for", "use_fp32_compute"]
