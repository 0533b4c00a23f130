"""One-row calls of a dense bf16/fp16 `nn.Linear` on CPU run on the matrix-vector kernel this CPU measures fastest.

Why: a decode step is a one-row call of every dense layer, and the tied LLM head (151936x2048, 0.62 GB) is
half of a `cpu`-preset token's bytes. Which kernel streams it fastest depends on the CPU:
- Intel Xeon with AMX: `torch.mv` (oneDNN) is 1.2-1.7x faster than `F.linear`'s GEMM route (head 52 -> 35 ms).
- AMD EPYC Zen 4 (AVX512-BF16): oneDNN's `torch.mv` is 2.1x slower than `F.linear` (head 45 -> 97 ms), and
  ATen's own matrix-vector kernel (oneDNN switched off for the call) is 1.7-1.8x faster (45 -> 25 ms, 24 GB/s
  against a 44 GB/s read bandwidth).
So the kernel is measured (`measure_one_row_kernel`, ~0.1 s on a 64 MB weight: the head is far larger than any
cache) once per process, when the CPU plan is made, and the plan hands it to `use_row_gemv`. The results agree to the accumulation order (within a bf16 rounding).
fp32 weights gain nothing robust (0.9-1.2x), so they keep `F.linear`.

"mv-aten" toggles the process-wide `torch.backends.mkldnn.enabled` around the call: a concurrent oneDNN call
on another thread would take ATen's kernels for that moment (same results within rounding, no error).
Model-agnostic and removable: each layer gets a `RowGemvHook` named `HOOK_NAME` in its registry (it routes one
row and passes every other call, and layers whose weight is oneDNN-packed, on to the rest of the chain).
`scripts/bench_cpu.py --only kernels` measures them side by side.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from offload.registry import ROUTING, HookedLayers, ModuleHook, add_hook, forward_is_overridden, get_hook

#: Weight dtypes whose one-row calls may leave `F.linear` (where `measure_one_row_kernel` finds it faster).
GEMV_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
#: The probe: a [16384, 2048] weight (64 MB in bf16: out of cache, like the head), interleaved rounds, median;
#: a kernel replaces `F.linear` only when it is clearly faster.
PROBE_SHAPE, PROBE_ROUNDS, PROBE_MARGIN = (16384, 2048), 5, 0.9
#: The name these hooks have in each layer's registry.
HOOK_NAME = "cpu.row_gemv"


def _mv(w: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.mv(w, v) if bias is None else torch.addmv(bias, w, v)  # bias fused, as F.linear does


def _mv_aten(w: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # ATen's own vectorized matrix-vector kernel
    try:
        return _mv(w, v, bias)
    finally:
        torch.backends.mkldnn.enabled = enabled


#: name -> (weight [N, K], x [K], bias) -> [N]; "linear" is `F.linear` itself (no override).
ONE_ROW_KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "linear": lambda w, v, b: F.linear(v, w, b), "mv": _mv, "mv-aten": _mv_aten,
}


def measure_one_row_kernel(dtype: torch.dtype = torch.bfloat16) -> str:
    """The fastest of `ONE_ROW_KERNELS` for one row on this CPU, measured now (with the threads set now)."""
    w = torch.full(PROBE_SHAPE, 0.01, dtype=dtype)
    x = torch.full((PROBE_SHAPE[1],), 0.5, dtype=dtype)
    times: dict[str, list[float]] = {name: [] for name in ONE_ROW_KERNELS}
    for _ in range(PROBE_ROUNDS):
        for name, kernel in ONE_ROW_KERNELS.items():
            t0 = time.perf_counter()
            kernel(w, x, None)
            times[name].append(time.perf_counter() - t0)
    best = {name: statistics.median(t[1:]) for name, t in times.items()}
    fastest = min(best, key=best.__getitem__)
    return fastest if best[fastest] < PROBE_MARGIN * best["linear"] else "linear"


def row_gemv_forward(layer: nn.Linear, x: torch.Tensor, kernel: str = "mv") -> torch.Tensor:
    """`layer(x)`, with one row of a CPU input computed by `kernel` (see `ONE_ROW_KERNELS`)."""
    w = layer.weight
    if x.device.type != "cpu" or x.numel() != layer.in_features or x.dtype != w.dtype or w.device != x.device:
        return F.linear(x, w, layer.bias)
    y = ONE_ROW_KERNELS[kernel](w, x.reshape(-1), layer.bias)
    return y.reshape(*x.shape[:-1], layer.out_features)


class RowGemvHook(ModuleHook):
    """One row of a CPU input on `kernel`; anything else (more rows, another device or dtype, a packed weight)
    goes on down the chain."""

    order = ROUTING

    def __init__(self, kernel: str) -> None:
        self.kernel = kernel

    def forward(self, module: nn.Module, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        x = args[0] if len(args) == 1 and not kwargs else None
        w = module.weight
        if (not isinstance(x, torch.Tensor) or w.is_mkldnn or x.device.type != "cpu" or x.numel() != module.in_features
                or x.dtype != w.dtype or w.device != x.device):
            return inner(*args, **kwargs)
        y = ONE_ROW_KERNELS[self.kernel](w, x.reshape(-1), module.bias)
        return y.reshape(*x.shape[:-1], module.out_features)



def use_row_gemv(root: nn.Module, kernel: str | None = None) -> HookedLayers:
    """Route one-row calls of every plain bf16/fp16 `nn.Linear` under `root` through a matrix-vector kernel.

    `kernel`: one of `ONE_ROW_KERNELS` (the CPU plan's `one_row_kernel`); None measures it now. With "linear"
    (`F.linear` is the fastest here) nothing is hooked.
    """
    if kernel is not None and kernel not in ONE_ROW_KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(ONE_ROW_KERNELS)}, not {kernel!r}")
    state = HookedLayers(HOOK_NAME)
    chosen: dict[torch.dtype, str] = {}  # this call's measurements, per weight dtype
    for module in root.modules():
        if (type(module) is nn.Linear and module.weight.dtype in GEMV_DTYPES and not forward_is_overridden(module)
                and get_hook(module, HOOK_NAME) is None):
            if kernel is None and module.weight.dtype not in chosen:
                chosen[module.weight.dtype] = measure_one_row_kernel(module.weight.dtype)
            name = kernel or chosen[module.weight.dtype]
            if name == "linear":
                continue
            add_hook(module, HOOK_NAME, RowGemvHook(name))
            state.layers.append(module)
    return state


__all__ = ["GEMV_DTYPES", "HOOK_NAME", "ONE_ROW_KERNELS", "RowGemvHook", "measure_one_row_kernel",
           "row_gemv_forward", "use_row_gemv"]
