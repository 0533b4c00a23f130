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

Only where oneDNN's bf16 GEMM is native (the CPU plan's `native_bf16`): elsewhere bf16 Linears compute in fp32
(`lite/runtime/cpu/compute.py`). A `PackedLinearHook` named `HOOK_NAME` in the layer's registry: it owns the
packed weight and puts the plain one back when removed; it `changes_tensors`, so paging takes it off the
layers it pages and puts it back afterwards (`offload/hooks.py`).
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from offload.registry import (KERNEL, HookedLayers, ModuleHook, add_hook, forward_is_overridden, get_hook,
                              hooked_modules, remove_hook)

PACKED_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16,)
#: The name these hooks have in each layer's registry.
HOOK_NAME = "cpu.prepack"


def prepack_ops_available() -> bool:
    """Whether this torch build has oneDNN's packed-Linear ops (a fact of the build; the CPU plan asks it once)."""
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise"))


def packed_forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != layer.weight.dtype:  # as F.linear would: a dtype mismatch is the caller's error
        raise RuntimeError(f"expected {layer.weight.dtype} input for a packed Linear, got {x.dtype}")
    return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")


class PackedLinearHook(ModuleHook):
    """The layer's weight in oneDNN's blocked layout while attached, and its calls on oneDNN's packed kernel."""

    order = KERNEL
    changes_tensors = True

    def attach(self, module: nn.Module) -> None:
        packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)
        module.weight = nn.Parameter(packed, requires_grad=False)

    def detach(self, module: nn.Module) -> None:
        module.weight = nn.Parameter(module.weight.data.to_dense(), requires_grad=False)

    def forward(self, module: nn.Module, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return packed_forward(module, *args, **kwargs)  # type: ignore[arg-type]



def unpack_linears(root: nn.Module) -> int:
    """Take the packing hook off every layer under `root` that has one (whoever packed it); returns how many."""
    layers = [module for module, _ in hooked_modules(root, HOOK_NAME)]
    for layer in layers:
        remove_hook(layer, HOOK_NAME)
    return len(layers)


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


def packable(module: nn.Module, mapped: list[tuple[int, int]]) -> bool:
    """A plain CPU bf16 `nn.Linear`, not packed yet, not overridden by someone else, not a view of a mapped file."""
    return (type(module) is nn.Linear and not forward_is_overridden(module) and get_hook(module, HOOK_NAME) is None
            and module.weight.dtype in PACKED_DTYPES and module.weight.device.type == "cpu"
            and not module.weight.is_mkldnn and not _in_ranges(module.weight.data_ptr(), mapped))


def use_packed_linears(root: nn.Module, skip: Callable[[str], bool] = lambda name: False,
                       native: bool = True) -> HookedLayers:
    """Pack every plain CPU bf16 `nn.Linear` under `root` whose qualified name `skip` does not exclude.

    `native`: whether oneDNN's bf16 GEMM is native here (the CPU plan's `native_bf16`); nothing is packed
    where it is not, nor where this torch lacks the ops. Weights that are views of a memory-mapped checkpoint
    stay as they are: the shard's mapping keeps their pages resident while the packed copy would add as much
    again (0.62 GB for the full-size ViT: RSS 3.35 -> 3.97 GB). Weights the loader converted or copied (the
    Yak's, stored in fp32) are packed in place of themselves."""
    state = HookedLayers(HOOK_NAME)
    if not native or not prepack_ops_available():
        return state
    mapped = file_backed_ranges()
    for name, module in root.named_modules():
        if packable(module, mapped) and not skip(name):
            add_hook(module, HOOK_NAME, PackedLinearHook())
            state.layers.append(module)
    return state


__all__ = ["HOOK_NAME", "PACKED_DTYPES", "PackedLinearHook", "file_backed_ranges", "packable",
           "packed_forward", "prepack_ops_available", "unpack_linears", "use_packed_linears"]
