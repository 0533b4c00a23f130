"""One-row calls of a dense bf16/fp16 `nn.Linear` on CPU run on the matrix-vector kernel this CPU measures fastest.

Why: a decode step is a one-row call of every dense layer, and the tied LLM head (151936x2048, 0.62 GB) is
half of a `cpu`-preset token's bytes. Which kernel streams it fastest depends on the CPU:
- Intel Xeon with AMX: `torch.mv` (oneDNN) is 1.2-1.7x faster than `F.linear`'s GEMM route (head 52 -> 35 ms).
- AMD EPYC Zen 4 (AVX512-BF16): oneDNN's `torch.mv` is 2.1x slower than `F.linear` (head 45 -> 97 ms), and
  ATen's own matrix-vector kernel (oneDNN switched off for the call) is 1.7-1.8x faster (45 -> 25 ms, 24 GB/s
  against a 44 GB/s read bandwidth).
So the kernel is measured once per process and dtype (`one_row_kernel`, ~0.1 s on a 64 MB weight: the
head is far larger than any cache). The results agree to the accumulation order (within a bf16 rounding).
fp32 weights gain nothing robust (0.9-1.2x), so they keep `F.linear`.

"mv-aten" toggles the process-wide `torch.backends.mkldnn.enabled` around the call: a concurrent oneDNN call
on another thread would take ATen's kernels for that moment (same results within rounding, no error).
Model-agnostic and removable: each layer gets an instance-level `forward` (its hooks still run).
`scripts/bench_cpu.py --only kernels` measures them side by side.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

#: Weight dtypes whose one-row calls may leave `F.linear` (where `one_row_kernel` measures it faster).
GEMV_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
#: The probe: a [16384, 2048] weight (64 MB in bf16: out of cache, like the head), interleaved rounds, median;
#: a kernel replaces `F.linear` only when it is clearly faster.
PROBE_SHAPE, PROBE_ROUNDS, PROBE_MARGIN = (16384, 2048), 5, 0.9


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


@functools.cache
def one_row_kernel(dtype: torch.dtype) -> str:
    """The fastest of `ONE_ROW_KERNELS` for one row on this CPU, measured (with the threads set now)."""
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


@dataclass
class RowGemv:
    """The layers `use_row_gemv` changed, so `remove()` can put their class forward back."""

    layers: list[nn.Linear] = field(default_factory=list)

    def remove(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        self.layers.clear()


def use_row_gemv(root: nn.Module, kernel: str | None = None) -> RowGemv:
    """Route one-row calls of every plain bf16/fp16 `nn.Linear` under `root` through a matrix-vector kernel.

    `kernel`: one of `ONE_ROW_KERNELS`; None (the runtime's choice) measures it per dtype (`one_row_kernel`),
    and layers whose fastest kernel is `F.linear` are left as they are.
    """
    if kernel is not None and kernel not in ONE_ROW_KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(ONE_ROW_KERNELS)}, not {kernel!r}")
    state = RowGemv()
    for module in root.modules():
        if type(module) is nn.Linear and module.weight.dtype in GEMV_DTYPES and "forward" not in module.__dict__:
            chosen = kernel or one_row_kernel(module.weight.dtype)
            if chosen == "linear":
                continue
            module.forward = functools.partial(row_gemv_forward, module, kernel=chosen)  # type: ignore[method-assign]
            state.layers.append(module)
    return state


__all__ = ["GEMV_DTYPES", "ONE_ROW_KERNELS", "RowGemv", "one_row_kernel", "row_gemv_forward", "use_row_gemv"]
