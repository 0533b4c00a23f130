"""bf16 storage, fp32 compute: keep a module tree's weights in bf16 (the planned memory) but run every
layer in fp32, casting each weight for the duration of its own call.

Why: on a CPU without native bf16 (AVX2-only x86, for one) torch emulates bf16 GEMMs 10-90x slower
than fp32, while casting one layer's weight per call costs a fraction of the GEMM (measured on an
AMD EPYC with the AVX2 code path: 0.6-0.95 of the fp32 GEMM rate, against 0.1-0.2 for bf16 compute).

Model-agnostic and removable (`use_fp32_compute(root).remove()`), per module, by what it holds:
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
from torch.utils.hooks import RemovableHandle

LOW_PRECISION: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)


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


def _is_backend_layer(module: nn.Module) -> bool:
    """A layer a quant backend built (it chooses its own kernel); imported late: backends import heavy libs."""
    from .backends import backend_of

    return backend_of(module) is not None


@dataclass
class Fp32Compute:
    """What `use_fp32_compute` changed, so it can be undone exactly."""

    handles: list[RemovableHandle] = field(default_factory=list)
    compute_dtypes: list[tuple[nn.Module, torch.dtype | None]] = field(default_factory=list)
    swapped: int = 0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for module, dtype in self.compute_dtypes:
            module.compute_dtype = dtype
        self.handles.clear()
        self.compute_dtypes.clear()

    def __enter__(self) -> "Fp32Compute":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


#: A Linear called on at most this many rows (a decode step) runs its bf16 GEMV as stored and returns fp32:
#: it is memory-bound, reads half the bytes and needs no cast (AMD EPYC, AVX2 path, 6144x2048: 5x faster
#: than casting the weight at 1-4 rows, still faster at 16, slower from ~64).
SMALL_ROWS = 16


def _rows(args: tuple[Any, ...]) -> int | None:
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    return x.numel() // max(1, x.shape[-1])


def _param_swap_hooks(module: nn.Module, names: list[str]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    saved: list[dict[str, nn.Parameter] | None] = []  # a stack: a module may be re-entered (shared submodule)
    gemv_ok = type(module) is nn.Linear

    def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        rows = _rows(args) if gemv_ok else None
        if rows is not None and rows <= SMALL_ROWS and args[0].is_floating_point():
            saved.append(None)  # decode-sized: the stored bf16 weight as it is, fp32 out (see SMALL_ROWS)
            return (args[0].to(mod.weight.dtype), *args[1:]), kwargs
        originals = {n: mod._parameters[n] for n in names}
        saved.append(originals)
        for n, p in originals.items():
            if p is not None and p.dtype in LOW_PRECISION:
                mod._parameters[n] = p.detach().float()  # type: ignore[assignment]  # for this call only
        return _to_fp32(args), {k: _to_fp32(v) for k, v in kwargs.items()}

    def post(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        originals = saved.pop()
        if originals is None:
            return _to_fp32(output)
        for n, p in originals.items():
            mod._parameters[n] = p
        return output

    return pre, post


def _embedding_hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    return _to_fp32(output)


def _backend_input_hook(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A backend layer gets its activations in the dtype it was built for (quanto and bnb layers compute in
    their own base dtype and may refuse fp32 inputs)."""
    dtype = getattr(mod, "compute_dtype", None) or getattr(getattr(mod, "weight", None), "dtype", None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype == torch.float32:
        return args
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def use_fp32_compute(root: nn.Module) -> Fp32Compute:
    """Make every layer under `root` compute in fp32 while its weights stay as stored (see module doc)."""
    state = Fp32Compute()
    for module in root.modules():
        if hasattr(module, "compute_dtype"):  # None = "the weight's dtype" (the VTE table)
            dtype = module.compute_dtype
            if dtype is None or dtype in LOW_PRECISION:
                state.compute_dtypes.append((module, dtype))
                module.compute_dtype = torch.float32
            continue
        if _is_backend_layer(module):
            # it runs its own kernel in its own dtype; the rest of the tree must still see fp32
            state.handles.append(module.register_forward_pre_hook(_backend_input_hook))
            state.handles.append(module.register_forward_hook(_embedding_hook))
            continue
        if isinstance(module, nn.Embedding):
            if module.weight.dtype in LOW_PRECISION:
                state.handles.append(module.register_forward_hook(_embedding_hook))
            continue
        names = _own_low_params(module)
        if not names:
            continue
        pre, post = _param_swap_hooks(module, names)
        state.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        state.handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))
        state.swapped += 1
    return state


__all__ = ["Fp32Compute", "use_fp32_compute"]
