"""One-row calls of a dense bf16/fp16 `nn.Linear` on CPU run as `torch.mv` / `addmv`, the matrix-vector kernel.

Why: `F.linear` sends a [1, K] x [N, K]^T call down the general GEMM route, which on CPU is 1.2-1.7x
slower for the same result (bitwise: the same kernel accumulates it). Intel Xeon with AMX, bf16: the
tied LLM head 151936x2048 52 -> 35 ms, 6144x2048 1.2-1.5x, 1024x2048 1.1 -> 0.5 ms; ATen's AVX2
code path 1.0-1.6x. A decode step is such a call for every dense layer, and the tied head is half of a
`cpu`-preset token's bytes. fp32 weights gain nothing robust (0.9-1.2x), so they keep `F.linear`.

Model-agnostic and removable: each layer gets an instance-level `forward` (its hooks still run).
`scripts/bench_cpu.py --only kernels` measures the two side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

#: Weight dtypes whose one-row calls take `torch.mv` (measured faster on every CPU code path tried).
GEMV_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)


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


def use_row_gemv(root: nn.Module) -> RowGemv:
    """Route one-row calls of every plain bf16/fp16 `nn.Linear` under `root` through `torch.mv`."""
    state = RowGemv()
    for module in root.modules():
        if type(module) is nn.Linear and module.weight.dtype in GEMV_DTYPES and "forward" not in module.__dict__:
            module.forward = row_gemv_forward.__get__(module)  # type: ignore[method-assign]
            state.layers.append(module)
    return state


__all__ = ["GEMV_DTYPES", "RowGemv", "row_gemv_forward", "use_row_gemv"]
