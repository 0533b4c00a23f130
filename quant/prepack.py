"""Token-wise bf16 `nn.Linear`s on CPU with their weight reordered once into oneDNN's blocked layout.

Why: on CPU a bf16 `F.linear` hands the [N, K] weight to oneDNN, which reorders it into its AMX/AVX512 blocked
layout on every call: a pass over the whole weight per call. Reordered once at load
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's weight freezing does) and run through
`torch.ops.mkldnn._linear_pointwise`, the same GEMMs ran 6-29% faster per layer, the quick Yak pass at 256²
1.17x faster, and a full-size `cpu`-preset 512² t2i's denoising 24.2 -> 22.4 s (Intel Xeon AMX, 2 cores;
`scripts/bench_cpu.py`, `scripts/bench_e2e.py`). The cost is one reorder per weight at load (~3 s for the
full-size Yak in a VM, mostly page faults of the new memory). The packed weight takes the place of the
plain one (same bytes), and its outputs are bitwise those of `F.linear` on two or more rows (tested). On
one row `F.linear` takes another kernel (2 of 18432 outputs differ by an ulp), so layers that run on one
row (adaLN modulation, the time and vector embedders) are left out by the caller's `skip`.

Only where oneDNN's bf16 GEMM is native (`dense_gemm_is_native`): elsewhere bf16 Linears compute in fp32
(`quant.compute`). Removable: `remove()` puts the plain weight and the class forward back (offloading
needs plain tensors it can copy).
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass, field
from pathlib import Path
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


def file_backed_ranges(maps: str | None = None) -> list[tuple[int, int]]:
    """Address ranges of this process's file mappings (Linux `/proc/self/maps`; empty elsewhere), sorted."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return []
    ranges = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            lo, hi = fields[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return sorted(ranges)


def _in_ranges(address: int, ranges: list[tuple[int, int]]) -> bool:
    i = bisect.bisect_right(ranges, (address, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= address < ranges[i][1]


def use_packed_linears(root: nn.Module, skip: Callable[[str], bool] = lambda name: False) -> PackedLinears:
    """Pack every plain CPU bf16 `nn.Linear` under `root` whose qualified name `skip` does not exclude.

    Weights that are views of a memory-mapped checkpoint stay as they are: the shard's mapping keeps their
    pages resident while the packed copy would add as much again (0.62 GB for the full-size ViT: RSS
    3.35 -> 3.97 GB). Weights the loader converted or copied (the Yak's, stored in fp32) are packed in place
    of themselves."""
    state = PackedLinears()
    if not prepack_available(torch.bfloat16):
        return state
    mapped = file_backed_ranges()
    for name, module in root.named_modules():
        if (type(module) is not nn.Linear or "forward" in module.__dict__ or skip(name)
                or module.weight.dtype not in PACKED_DTYPES or module.weight.device.type != "cpu"
                or module.weight.is_mkldnn or _in_ranges(module.weight.data_ptr(), mapped)):
            continue
        packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)
        module.weight = nn.Parameter(packed, requires_grad=False)
        module.forward = functools.partial(packed_forward, module)  # type: ignore[method-assign]
        state.layers.append(module)
    return state


__all__ = ["PACKED_DTYPES", "PackedLinears", "file_backed_ranges", "packed_forward", "prepack_available", "unpack_linears",
           "use_packed_linears"]
