"""One-row calls of a dense bf16/fp16 `nn.Linear` on CPU run as `torch.mv` / `addmv`, where that is faster.

Why: a decode step is a one-row call of every dense layer, and the tied LLM head (151936x2048) is half of
a `cpu`-preset token's bytes. Which kernel is faster depends on the CPU: on an Intel Xeon with AMX (and
ATen's AVX2 code path) `F.linear`'s GEMM route is 1.2-1.7x slower than the matrix-vector kernel (head
52 -> 35 ms), while on an AMD EPYC Zen 4 (AVX512-BF16, oneDNN's brgemm) `torch.mv` is 2.1-2.3x slower
(head 34 -> 77 ms). So the choice is measured once per process and dtype (`row_gemv_is_faster`, ~30 ms).
The results agree to the accumulation order (bitwise at small shapes; not always at the head's).
fp32 weights gain nothing robust (0.9-1.2x), so they keep `F.linear`.

Model-agnostic and removable: each layer gets an instance-level `forward` (its hooks still run).
`scripts/bench_cpu.py --only kernels` measures the two side by side.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

#: Weight dtypes whose one-row calls may take `torch.mv` (where `row_gemv_is_faster` measures it so).
GEMV_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
#: The probe: a [4096, 2048] weight (16 MB in bf16, the LLM's layer width), interleaved rounds, median;
#: `torch.mv` is taken only when it is clearly faster.
PROBE_SHAPE, PROBE_ROUNDS, PROBE_MARGIN = (4096, 2048), 7, 0.9


@functools.cache
def row_gemv_is_faster(dtype: torch.dtype) -> bool:
    """Whether `torch.mv` beats `F.linear` for one row on this CPU, measured (with the threads set now)."""
    w = torch.full(PROBE_SHAPE, 0.01, dtype=dtype)
    x = torch.full((1, PROBE_SHAPE[1]), 0.5, dtype=dtype)
    gemm: list[float] = []
    gemv: list[float] = []
    for _ in range(PROBE_ROUNDS):
        for fn, times in ((lambda: F.linear(x, w), gemm), (lambda: torch.mv(w, x[0]), gemv)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(gemv[1:]) < PROBE_MARGIN * statistics.median(gemm[1:])


def row_gemv_forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`, with one row of a CPU input computed as weight @ x."""
    w = layer.weight
    if x.device.type != "cpu" or x.numel() != layer.in_features or x.dtype != w.dtype or w.device != x.device:
        return F.linear(x, w, layer.bias)
    v = x.reshape(-1)
    y = torch.mv(w, v) if layer.bias is None else torch.addmv(layer.bias, w, v)  # bias fused, as F.linear does
    return y.reshape(*x.shape[:-1], layer.out_features)


@dataclass
class RowGemv:
    """The layers `use_row_gemv` changed, so `remove()` can put their class forward back."""

    layers: list[nn.Linear] = field(default_factory=list)

    def remove(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        self.layers.clear()


def use_row_gemv(root: nn.Module, measured: bool = True) -> RowGemv:
    """Route one-row calls of every plain bf16/fp16 `nn.Linear` under `root` through `torch.mv`.

    `measured`: only for weight dtypes whose matrix-vector kernel `row_gemv_is_faster` on this CPU.
    """
    state = RowGemv()
    for module in root.modules():
        if type(module) is nn.Linear and module.weight.dtype in GEMV_DTYPES and "forward" not in module.__dict__:
            if measured and not row_gemv_is_faster(module.weight.dtype):
                continue
            module.forward = row_gemv_forward.__get__(module)  # type: ignore[method-assign]
            state.layers.append(module)
    return state


__all__ = ["GEMV_DTYPES", "RowGemv", "row_gemv_forward", "row_gemv_is_faster", "use_row_gemv"]
