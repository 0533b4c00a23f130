"""Layout-preserving tensor moves for plain, quanto and bitsandbytes weights.

The offloader must copy a weight between host and device many times without changing its bits
or its packing. `Tensor.to` is not that operation for quantized weights: quanto re-packs on a
device-type change and bitsandbytes' `Params4bit.to` moves `quant_state` *in place* (so host and
device copies would share one state). Here every weight is taken apart into its leaf tensors,
each leaf is moved, and the wrapper is rebuilt around the moved leaves.
"""

from __future__ import annotations

import copy as _copy
import sys
from typing import Callable, Iterator

import torch
from torch import nn

LeafFn = Callable[[torch.Tensor], torch.Tensor]


class OffloadedTensorError(RuntimeError):
    """Raised when code computes with a weight whose unit is not on the execution device."""


_METADATA_FUNCS = frozenset(
    {"__get__", "size", "numel", "element_size", "dim", "nelement", "stride", "is_contiguous",
     "__repr__", "__format__", "__hash__", "__eq__", "is_floating_point", "is_complex", "get_device"}
)


class OffloadedPlaceholder(torch.Tensor):
    """Meta-backed stand-in for an offloaded weight: metadata reads work, any compute raises.

    A plain `meta` tensor is not enough: on torch 2.13 a CPU matmul with a meta weight silently
    returns garbage, so a missed onload would go unnoticed in simulate mode.
    """

    _offload_label: str = "?"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        if getattr(func, "__name__", "") in _METADATA_FUNCS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        label = next((a._offload_label for a in args if isinstance(a, OffloadedPlaceholder)), "?")
        name = getattr(func, "__name__", repr(func))
        raise OffloadedTensorError(f"weight {label} is offloaded; '{name}' ran without an onload (missing offload hook?)")


class _OffloadedQuantState:
    """Non-None `quant_state` for 4-bit placeholders so bitsandbytes does not try to rebuild the weight."""

    packing_format_for_cpu = False


def placeholder_like(obj: torch.Tensor, label: str) -> torch.Tensor:
    """A loud, zero-byte stand-in with `obj`'s shape and dtype."""
    base = torch.empty(tuple(obj.shape), dtype=obj.dtype, device="meta")
    ph = torch.Tensor._make_subclass(OffloadedPlaceholder, base, False)
    ph._offload_label = label
    if is_params4bit(obj):
        ph.quant_state = _OffloadedQuantState()  # type: ignore[attr-defined]
    return ph


def is_placeholder(obj: object) -> bool:
    return isinstance(obj, OffloadedPlaceholder)


def is_params4bit(obj: object) -> bool:
    """True for bitsandbytes `Params4bit` (checked without importing bitsandbytes)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(obj, bnb.nn.Params4bit)


def is_wrapper_subclass(obj: torch.Tensor) -> bool:
    """True for tensor subclasses that hold their bytes in inner tensors (quanto QTensors)."""
    return hasattr(obj, "__tensor_flatten__") and type(obj) not in (torch.Tensor, nn.Parameter) and not is_params4bit(obj)


def _wrap_like(obj: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    if isinstance(obj, nn.Parameter):
        return nn.Parameter(new, requires_grad=obj.requires_grad)
    return new


def _map_quant_state(state: object, fn: LeafFn) -> object:
    new = _copy.copy(state)
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            setattr(new, name, fn(value))
    nested = getattr(state, "state2", None)
    if nested is not None:
        new.state2 = _map_quant_state(nested, fn)  # type: ignore[attr-defined]
    return new


def map_leaves(obj: torch.Tensor, fn: LeafFn) -> torch.Tensor:
    """Rebuild `obj` (Parameter, quanto QTensor or Params4bit) with `fn` applied to every leaf tensor."""
    if is_params4bit(obj):
        bnb = sys.modules["bitsandbytes"]
        state = obj.quant_state
        return bnb.nn.Params4bit(
            data=fn(obj.data),
            requires_grad=False,
            quant_state=None if state is None else _map_quant_state(state, fn),
            blocksize=obj.blocksize,
            compress_statistics=obj.compress_statistics,
            quant_type=obj.quant_type,
            quant_storage=obj.quant_storage,
            module=obj.module,
            bnb_quantized=obj.bnb_quantized,
        )
    if is_wrapper_subclass(obj):
        names, meta = obj.__tensor_flatten__()
        inner = {name: map_leaves(getattr(obj, name), fn) for name in names}
        rebuilt = type(obj).__tensor_unflatten__(inner, meta, obj.size(), obj.stride())
        return _wrap_like(obj, rebuilt)
    base = obj.detach() if isinstance(obj, nn.Parameter) else obj
    return _wrap_like(obj, fn(base))


def leaves(obj: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold `obj`'s bytes (for `record_stream` and byte counts)."""
    if is_params4bit(obj):
        yield obj.data
        state = obj.quant_state
        while state is not None:
            for name in ("absmax", "code", "offset"):
                value = getattr(state, name, None)
                if isinstance(value, torch.Tensor):
                    yield value
            state = getattr(state, "state2", None)
        return
    if is_wrapper_subclass(obj):
        names, _ = obj.__tensor_flatten__()
        for name in names:
            yield from leaves(getattr(obj, name))
        return
    yield obj


#: CPU kernels (MKL, oneDNN) pick their inner loops by the operand's address modulo this (a cache line).
CPU_ALIGNMENT = 64


def cpu_copy_keeping_alignment(t: torch.Tensor) -> torch.Tensor:
    """A copy of a CPU tensor whose data sits at the same address modulo `CPU_ALIGNMENT` as `t`'s.

    Why: weights read zero-copy from a safetensors mmap are only 8/16-byte aligned, while a fresh
    tensor is 64-byte aligned, and on the AVX2 code path MKL's GEMM and oneDNN's convolution take a
    different (differently rounded) loop for the two: an offloaded copy then computed 1 ulp away from
    the resident weight (one pixel level in an edit). Same alignment, same kernel path, same bits.
    """
    offset = t.data_ptr() % CPU_ALIGNMENT
    if offset == 0 or not t.is_contiguous() or offset % t.element_size():
        return t.to("cpu", copy=True)
    nbytes = t.numel() * t.element_size()
    buf = torch.empty(nbytes + CPU_ALIGNMENT, dtype=torch.uint8)
    shift = (offset - buf.data_ptr()) % CPU_ALIGNMENT
    out = buf[shift: shift + nbytes].view(t.dtype).view(t.shape)
    return out.copy_(t)


def _copy_leaf(t: torch.Tensor, device: torch.device, non_blocking: bool) -> torch.Tensor:
    if device.type == "cpu" and t.device.type == "cpu":
        return cpu_copy_keeping_alignment(t)
    return t.to(device, non_blocking=non_blocking, copy=True)


def copy_to(obj: torch.Tensor, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
    """A fresh copy of `obj` on `device` with the same packing (no re-quantization, no re-packing).

    CPU to CPU, each leaf keeps its address alignment too (see `cpu_copy_keeping_alignment`).
    """
    target = torch.device(device)
    return map_leaves(obj, lambda t: _copy_leaf(t, target, non_blocking))


def pinned_copy(obj: torch.Tensor) -> torch.Tensor:
    """A host copy in page-locked memory (needed for truly asynchronous host-to-device copies)."""
    return map_leaves(obj, lambda t: t.to("cpu").pin_memory())


def unpack_cpu_4bit(obj: torch.Tensor) -> torch.Tensor:
    """Undo bitsandbytes' CPU repack (done by a CPU forward) so the weight is valid on a GPU.

    This is what `Params4bit.cuda()` does first; `Params4bit.to("cuda")` skips it (docs/deps.md §3).
    """
    state = getattr(obj, "quant_state", None)
    if not is_params4bit(obj) or not getattr(state, "packing_format_for_cpu", False):
        return obj
    # bitsandbytes pulls in torch._dynamo (seconds): only for a bnb layer, which has already loaded it.
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state = _copy.copy(state)
    data, state = _convert_weight_packed_for_cpu_inverse(obj.data, state)
    bnb = sys.modules["bitsandbytes"]
    return bnb.nn.Params4bit(
        data=data, requires_grad=False, quant_state=state, blocksize=obj.blocksize,
        compress_statistics=obj.compress_statistics, quant_type=obj.quant_type,
        quant_storage=obj.quant_storage, module=obj.module, bnb_quantized=True,
    )


def device_layout(obj: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`obj` converted to the packing its kernels need on `device` (quanto re-packs per device type)."""
    if is_params4bit(obj):
        return unpack_cpu_4bit(obj)
    if is_wrapper_subclass(obj) and obj.device.type != device.type:
        return _wrap_like(obj, obj.to(device))
    return obj


def standard_to(obj: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Move through the tensor's own `.to` (re-packing for the target device), keeping Parameter-ness."""
    if is_params4bit(obj):
        return copy_to(obj, device)
    moved = obj.to(device)
    return moved if moved is obj else _wrap_like(obj, moved.detach() if isinstance(moved, nn.Parameter) else moved)
