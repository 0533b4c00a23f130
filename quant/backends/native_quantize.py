"""The native backend's quantizers: int8 per row and int4 per group, in pure torch, one weight at a time.

Why apart from `torch_native`: they are the arithmetic (fp32 math on the way, in one reused scratch, no fp32
copy of a whole weight), the backend file is the layers and the protocol; both stay short.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .int4_layouts import MAGIC, pack_levels_

#: fp32 elements quantized at a time, in one scratch reused across chunks (2 MB: it stays in cache, and no
#: chunk allocates, or page-faults, fresh memory); chunks are whole multiples of 64 rows (every int4 block).
CHUNK_ELEMENTS = 1 << 19


def _chunks(w: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(r0, r1, an fp32 copy of w[r0:r1]) per chunk, in one reused scratch (never the caller's weight)."""
    n, k = w.shape
    step = max(64, CHUNK_ELEMENTS // k // 64 * 64)
    scratch = torch.empty(min(n, step) * k, dtype=torch.float32, device=w.device)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        yield r0, r1, scratch[: (r1 - r0) * k].view(r1 - r0, k).copy_(w[r0:r1])


def quantize_int8_rows(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 with the scale rounded to `scale_dtype` first, so q matches the stored scale."""
    w = weight.detach()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=scale_dtype, device=w.device)
    for r0, r1, wf in _chunks(w):
        absmax = wf.abs().amax(dim=1)
        s = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax)).to(scale_dtype)
        scale[r0:r1] = s
        # clamp, then + 2^23 + 256 rounds (half to even) and leaves q's two's-complement byte in the low byte
        levels = wf.mul_((1.0 / s.float())[:, None]).clamp_(-127, 127).add_(MAGIC + 256.0)
        q[r0:r1] = levels.view(torch.int8)[:, 0::4]  # no fp32 -> int8 cast (slow on CPU)
    return q, scale


def quantize_int4_groups(weight: torch.Tensor, group_size: int, param_dtype: torch.dtype,
                         layout_name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max int4 per group: (q, scales_and_zeros [K/g, N, 2] in `param_dtype`).

    w ~ (q - 8) * scale + zero, zero = min + 8 * scale, q in 0..15; scale and zero are rounded to
    `param_dtype` before q is chosen, so q is the nearest level of the grid the kernel really uses
    (q = round(w / scale + 8 - zero / scale), as one multiply and one add per weight).
    q is uint8 [N, K], or, with `layout_name`, already packed into that layout ([N, K/2]), chunk by
    chunk (chunks are multiples of every block size, so packing per chunk equals packing the whole).
    """
    n, k = weight.shape
    w = weight.detach()
    groups = k // group_size
    packed = layout_name is not None
    q = torch.empty((n, k // 2 if packed else k), dtype=torch.uint8, device=w.device)
    sz = torch.empty((groups, n, 2), dtype=param_dtype, device=w.device)
    for r0, r1, wf in _chunks(w):
        g = wf.view(r1 - r0, groups, group_size)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # two reductions: 8x faster than aminmax here
        scale = ((hi - lo).clamp_(min=1e-6) / 15.0).to(param_dtype)
        zero = (lo + 8.0 * scale.float()).to(param_dtype)
        sz[:, r0:r1, 0] = scale.t()
        sz[:, r0:r1, 1] = zero.t()
        inv = 1.0 / scale.float()
        offset = 8.0 - zero.float() * inv
        g.mul_(inv.unsqueeze(-1)).add_(offset.unsqueeze(-1)).round_().clamp_(0, 15)
        if packed:
            pack_levels_(wf, layout_name, out=q[r0:r1])
        else:
            q[r0:r1] = wf.add_(MAGIC).view(torch.uint8)[:, 0::4]
    return q, sz


__all__ = ["CHUNK_ELEMENTS", "quantize_int4_groups", "quantize_int8_rows"]
