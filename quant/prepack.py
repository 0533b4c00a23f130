"""Token-wise bf16 `nn.Linear`s on CPU with their weight reordered once into oneDNN's blocked layout.

Why: on CPU a bf16 `F.linear` hands the [N, K] weight to oneDNN, which reorders it into its AMX/AVX512 blocked
layout on every call: a pass over the whole weight per call. Reordered once at load
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's weight freezing does) and run through
`torch.ops.mkldnn._linear_pointwise`, the same GEMMs ran 6-29% faster per layer and the Yak pass at 256²
1.17x faster, the ViT at 1024 patches 1.06x (Intel Xeon AMX, 2 cores; `scripts/bench_cpu.py --only kernels`
and the Yak/ViT sections measure it). The packed weight takes the place of the plain one (same bytes), so
memory is unchanged, and its outputs are bitwise those of `F.linear` on two or more rows (tested). On one row
`F.linear` takes another kernel (2 of 18432 outputs differ by an ulp), so layers that run on one row (adaLN
modulation, the time and vector embedders) are left out by the caller's `skip`.

Only where oneDNN's bf16 GEMM is native (`dense_gemm_is_native`): elsewhere bf16 Linears compute in fp32
(`quant.compute`). Removable: `remove()` puts the plain weight and the class forward back (offloading
needs plain tensors it can copy).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .backends.int4_prefill import dense_gemm_is_native

PACKED_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16,)


@functools.cache
def prepack_available(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU run oneDNN's packed Linear natively in `dtype`."""
    if dtype not in PACKED_DTYPES or not torch.backends.mkldnn.is_available() or not dense_gemm_is_native(dtype):
        return False
    ops = torch.ops.mkldnn
    return all(hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise"))


def packed_forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != layer.weight.dtype:  # as F.linear would: a dtype mismatch is the caller's error
        raise RuntimeError(f"expected {layer.weight.dtype} input for a packed Linear, got {x.dtype}")
    return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")


@dataclass
class PackedLinears:
    """The layers `use_packed_linears` changed, so `remove()` can put their plain weights back."""

    layers: list[nn.Linear] = field(default_factory=list)

    def remove(self) -> None:
        for layer in self.layers:
            _unpack(layer)
        self.layers.clear()


def _unpack(layer: nn.Linear) -> None:
    layer.weight = nn.Parameter(layer.weight.data.to_dense(), requires_grad=False)
    layer.__dict__.pop("forward", None)


def unpack_linears(root: nn.Module) -> int:
    """Put the plain weight back in every packed Linear under `root` (whoever packed it); returns how many."""
    packed = [m for m in root.modules() if type(m) is nn.Linear and m.weight.is_mkldnn]
    for layer in packed:
        _unpack(layer)
    return len(packed)


def use_packed_linears(root: nn.Module, skip: Callable[[str], bool] = lambda name: False) -> PackedLinears:
    """Pack every plain CPU bf16 `nn.Linear` under `root` whose qualified name `skip` does not exclude."""
    state = PackedLinears()
    if not prepack_available(torch.bfloat16):
        return state
    for name, module in root.named_modules():
        if (type(module) is not nn.Linear or "forward" in module.__dict__ or skip(name)
                or module.weight.dtype not in PACKED_DTYPES or module.weight.device.type != "cpu"
                or module.weight.is_mkldnn):
            continue
        packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)
        module.weight = nn.Parameter(packed, requires_grad=False)
        module.forward = functools.partial(packed_forward, module)  # type: ignore[method-assign]
        state.layers.append(module)
    return state


__all__ = ["PACKED_DTYPES", "PackedLinears", "packed_forward", "prepack_available", "unpack_linears",
           "use_packed_linears"]
