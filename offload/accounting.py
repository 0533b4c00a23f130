"""Byte accounting for modules whose weights may be plain, quanto-quantized or bitsandbytes-quantized.

`sum(p.nbytes for p in module.parameters())` is wrong for quantized layers: quanto keeps its
payload in inner tensors of a tensor subclass, and bitsandbytes keeps `quant_state` (absmax,
code, nested state) outside the parameters. Both the quantizers and the offloader need one
honest count, so it lives here, in a module that depends on nothing but torch.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn


def _inner_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield the plain tensors that really hold `t`'s bytes (unwraps tensor subclasses)."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
        names, _ = flatten()
        for name in names:
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):
                yield from _inner_tensors(inner)
        return
    yield t
    quant_state = getattr(t, "quant_state", None)  # bitsandbytes Params4bit
    if quant_state is not None:
        yield from _quant_state_tensors(quant_state)


def _quant_state_tensors(state: object) -> Iterator[torch.Tensor]:
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            yield value
    nested = getattr(state, "state2", None)
    if nested is not None:
        yield from _quant_state_tensors(nested)


def _storage_key(t: torch.Tensor) -> tuple[str, int, int]:
    # Keyed by the tensor's own data pointer and size, not its storage: tensors read from one
    # memory-mapped file share a storage, while tied weights share the pointer itself.
    if t.device.type == "meta":
        return ("meta", id(t), 0)
    if t.is_mkldnn:  # oneDNN's packed layout (lite/runtime/cpu/prepack.py) has no storage to point at
        return ("mkldnn", id(t), t.numel() * t.element_size())
    return (str(t.device), t.data_ptr(), t.numel() * t.element_size())


def tensors_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the unique tensors behind `tensors`, subclasses unwrapped, shared weights once."""
    seen: set[tuple[str, int, int]] = set()
    total = 0
    for outer in tensors:
        for t in _inner_tensors(outer):
            key = _storage_key(t)
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def module_tensors(module: nn.Module, recurse: bool = True) -> Iterator[torch.Tensor]:
    """Parameters, buffers and extra tensors a quantizer attached (e.g. bnb `SCB`)."""
    yield from module.parameters(recurse=recurse)
    yield from module.buffers(recurse=recurse)
    mods = module.modules() if recurse else [module]
    for m in mods:
        state = getattr(m, "state", None)  # bnb Linear8bitLt keeps SCB on a state object
        for name in ("SCB", "CB"):
            value = getattr(state, name, None) if state is not None else None
            if isinstance(value, torch.Tensor):
                yield value


def module_nbytes(module: nn.Module, recurse: bool = True) -> int:
    """Honest byte size of a module: unique storages of every tensor that holds its weights."""
    return tensors_nbytes(module_tensors(module, recurse=recurse))
