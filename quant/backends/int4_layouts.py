"""The int4 weight layouts of torch's packed-int4 kernels, written out as nibble permutations in pure torch.

Why pure torch: a payload stores the layout it was made in, and a CPU whose kernel uses another layout
converts it without the kernel's converter (which exists only for the layout of the running CPU). And the
streaming quantizer packs each chunk of levels straight into the kernel's bytes as it goes.

- "portable": [N, K / 2] uint8, even k in the high nibble (what MPS/CUDA's converter takes).
- CPU layouts: blocks of R rows stored [K, R / 2] bytes; "lanes" keeps row j in the low nibble and row
  j + R/2 in the high one (AVX-512: R = 64, AVX2: R = 32), "pairs" rows 2i and 2i + 1 (the scalar path,
  and every kernel's short tail block).

Packing cost (AMD EPYC Zen 4): an fp32 -> uint8 cast is slow, every temporary of a few MB is fresh memory
from the OS (page faults), and byte transposes run ~8x slower per byte than int32 ones, so the quantizer's
levels are packed in place in its fp32 scratch into int32 words (`pack_levels_`), then transposed.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import QuantFormatError

PORTABLE = "portable"
#: name -> (rows per block, "lanes" = low nibble row j / high row j + block/2, "pairs" = rows n, n+1)
CPU_LAYOUTS: dict[str, tuple[int, str]] = {
    "cpu-avx512": (64, "lanes"), "cpu-avx2": (32, "lanes"),
    "cpu-pairs64": (64, "pairs"), "cpu-pairs32": (32, "pairs"), "cpu-pairs16": (16, "pairs"),
}


#: Adding 2^23 to a float in [0, 2^23) leaves that integer in the low mantissa bits of its float32 word.
MAGIC = float(2 ** 23)


def _write_ints(lo: torch.Tensor, hi: torch.Tensor, dest: torch.Tensor) -> None:
    """dest [B, K, R] = (lo | hi << 4) [B, R, K] transposed, from integer levels."""
    dest.copy_((lo.to(torch.uint8) | (hi.to(torch.uint8) << 4)).transpose(1, 2))


def _write_levels_(lo: torch.Tensor, hi: torch.Tensor, dest: torch.Tensor) -> None:
    """As `_write_ints`, from fp32 levels (rounded, 0..15), using `lo` as scratch (overwritten).

    The bytes are assembled into int32 words of 4 consecutive rows before the transposition: torch
    transposes 4-byte elements ~8x faster per byte than single bytes (AMD EPYC Zen 4, measured).
    """
    if lo.shape[1] % 4:  # (a block of 2-6 rows: too short for whole words)
        _write_ints(lo.to(torch.int32), hi.to(torch.int32), dest)
        return
    lo.add_(hi, alpha=16.0)  # one byte per element, exact: integers < 256
    pairs = lo[:, 0::2].add_(lo[:, 1::2], alpha=256.0).add_(MAGIC)  # exact: < 2^16, then < 2^24
    bits = pairs.view(torch.int32)  # 0x4B000000 | (byte 2i + 256 * byte 2i+1)
    words = (bits[:, 0::2] & 0xFFFF) | ((bits[:, 1::2] & 0xFFFF) << 16)  # little-endian: row 4i in the low byte
    b, k, rows = dest.shape
    dest.view(torch.int32).view(b, k, rows // 4).copy_(words.transpose(1, 2))


def _blocks(q: torch.Tensor, layout_name: str, out: torch.Tensor,
            write: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
    """Write levels q [N, K] into `out` (uint8 [N, K / 2], contiguous) in `layout_name`."""
    n, k = q.shape
    if layout_name == PORTABLE:
        even, odd = q[:, 0::2].to(torch.int32), q[:, 1::2].to(torch.int32)
        out.copy_((odd | (even << 4)).to(torch.uint8))
        return out
    if layout_name not in CPU_LAYOUTS:
        raise QuantFormatError(f"unknown int4 layout {layout_name!r}; known: {PORTABLE}, {', '.join(CPU_LAYOUTS)}")
    block, style = CPU_LAYOUTS[layout_name]
    full = n // block
    flat = out.view(-1)
    # (levels [B, rows, K], their style, bytes [B, K, rows / 2]); the kernel packs a short tail block as row pairs
    parts = [(q[: full * block].view(full, block, k), style, flat[: full * block * k // 2].view(full, k, block // 2))]
    tail = n - full * block
    if tail:
        parts.append((q[full * block:].unsqueeze(0), "pairs", flat[full * block * k // 2:].view(1, k, tail // 2)))
    for levels, kind, dest in parts:
        rows = levels.shape[1]
        if levels.shape[0] and rows:
            lo, hi = (levels[:, : rows // 2], levels[:, rows // 2:]) if kind == "lanes" else (levels[:, 0::2], levels[:, 1::2])
            write(lo, hi, dest)
    return out


def _new_out(q: torch.Tensor) -> torch.Tensor:
    return torch.empty((q.shape[0], q.shape[1] // 2), dtype=torch.uint8, device=q.device)


def pack_int4(q: torch.Tensor, layout_name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """q (levels 0..15, [N, K], any int dtype) -> uint8 [N, K / 2] in `layout_name` (into `out` if given)."""
    return _blocks(q, layout_name, _new_out(q) if out is None else out, _write_ints)


def pack_levels_(levels: torch.Tensor, layout_name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """`pack_int4` from contiguous fp32 levels already rounded to 0..15, using `levels` as scratch (overwritten)."""
    return _blocks(levels, layout_name, _new_out(levels) if out is None else out, _write_levels_)


def _unpack_block(p: torch.Tensor, style: str) -> torch.Tensor:
    """Packed [B, K, rows/2] -> q uint8 [B, rows, K] of one block style."""
    lo, hi = (p & 0x0F).transpose(1, 2), (p >> 4).transpose(1, 2)
    if style == "lanes":
        return torch.cat([lo, hi], dim=1)
    return torch.stack([lo, hi], dim=2).reshape(p.shape[0], -1, p.shape[1])


def unpack_int4(packed: torch.Tensor, layout_name: str) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 [N, K / 2] -> q uint8 [N, K]."""
    n, half = packed.shape
    k = half * 2
    if layout_name == PORTABLE:
        return torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(n, k)
    if layout_name not in CPU_LAYOUTS:
        raise QuantFormatError(f"unknown int4 layout {layout_name!r}; known: {PORTABLE}, {', '.join(CPU_LAYOUTS)}")
    block, style = CPU_LAYOUTS[layout_name]
    full = n // block
    flat = packed.reshape(-1)
    parts = []
    if full:
        body = flat[: full * block * half].view(full, k, block // 2)
        parts.append(_unpack_block(body, style).reshape(full * block, k))
    tail = n - full * block
    if tail:
        parts.append(_unpack_block(flat[full * block * half:].view(1, k, tail // 2), "pairs").reshape(tail, k))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


__all__ = ["CPU_LAYOUTS", "MAGIC", "PORTABLE", "pack_int4", "pack_levels_", "unpack_int4"]
