"""Prefill-sized calls of a CPU packed-int4 layer: unpack into a reused buffer, then one dense GEMM.

Why: torch 2.13's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) has no blocked/AMX path: its time grows
with the rows (6144x2048, Intel Xeon with AMX: 15 ms at 64 rows, 54-84 ms at 256, 238 ms at 1024, against
a 4-18 ms bf16 GEMM; AMD EPYC Zen 5: 0.08 ms per row). Dequantizing the stored nibbles costs a fixed
~5.5 ms there (Xeon AMX, bf16) whatever the rows, so above `DENSE_ABOVE_ROWS` rows the layer writes its weight
straight into the dense GEMM's [K, N] operand (the kernel's blocks are k-major, so no transposition is needed):
two nibble passes, a cast, then one multiply-add per group in the compute dtype; then `x @ W`. Decode (1 row) keeps
the kernel, which reads 4 bits per weight.

Layouts (see `torch_native`): a block of R rows is stored [K, R/2] bytes; "lanes" keeps row j in the low
nibble and row j + R/2 in the high one, "pairs" rows 2i and 2i + 1. The buffers are per thread and grow to
the largest layer (LLM MLP: 12.6 M weights = 25 MB in bf16 + 12.6 MB of nibbles), so nothing is allocated
(or page-faulted) per call; `workspace_bytes` tells the planner.
"""

from __future__ import annotations

import threading

import torch

#: Rows above which the dense path runs. Measured crossover: ~70 rows (Intel Xeon AMX), ~110 (AMD EPYC Zen 5).
DENSE_ABOVE_ROWS = 128

_local = threading.local()


def _buffer(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    key = f"{name}-{dtype}"
    buffers: dict[str, torch.Tensor] | None = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def workspace_bytes(out_features: int, in_features: int, compute_dtype: torch.dtype) -> int:
    """Host bytes the dense path keeps for the largest [out, in] layer it has run (per thread)."""
    return out_features * in_features * (1 + torch.finfo(compute_dtype).bits // 8)


def dense_gemm_is_native(dtype: torch.dtype) -> bool:
    """Whether a dense GEMM in `dtype` has a real kernel here (oneDNN's own answer, asked per call: a flag read;
    the one source of truth for "bf16 is native", which the runtime's CPU plan also reads): bf16/fp16 GEMMs without oneDNN's support
    for them (AVX2-only CPUs) take a fallback ~50x slower than the int4 kernel (6144x2048 at 256 rows:
    18.8 s against 0.15 s, AMD EPYC under oneDNN's AVX2 cap)."""
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    if probe is None:
        return True
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN's ops: keep the dense path, as before
        return True


def supports(packed: torch.Tensor, layout: tuple[int, str] | None, out_features: int,
             compute_dtype: torch.dtype = torch.float32) -> bool:
    return (packed.device.type == "cpu" and layout is not None and out_features % layout[0] == 0
            and dense_gemm_is_native(compute_dtype))


def dense_weight(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, layout: tuple[int, str],
                 dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight as a [K, N] tensor in `dtype`: w[k, n] = (q - 8) * scale + zero (a reused buffer)."""
    block, style = layout
    groups, n = scales_and_zeros.shape[0], scales_and_zeros.shape[1]
    k = groups * group_size
    half = block // 2
    stored = packed.reshape(n // block, k, half).permute(1, 0, 2)  # [K, blocks, R/2], strided
    nibbles = _buffer("nibbles", k * n, torch.uint8)
    word = next((w for w in (torch.int64, torch.int32) if half % w.itemsize == 0
                 and packed.storage_offset() % w.itemsize == 0), None)
    if style == "lanes" and word is not None:
        # low and high nibbles of 8 (or 4) bytes at a time, straight into the two halves of each block (no
        # temporaries: 2.3-2.6x faster than splitting bytes, AMD EPYC Zen 4; int64 words 1.35x faster than int32
        # words, Intel Xeon AMX)
        mask = int.from_bytes(b"\x0f" * word.itemsize, "little")
        lanes = nibbles.view(k, n // block, 2, half)
        words = stored.view(word)
        torch.bitwise_and(words, mask, out=lanes[:, :, 0].view(word))
        torch.bitwise_right_shift(words, 4, out=lanes[:, :, 1].view(word)).bitwise_and_(mask)
    else:
        shape = (k, n // block, half, 2) if style == "pairs" else (k, n // block, 2, half)
        torch.stack([stored & 0x0F, stored >> 4], dim=3 if style == "pairs" else 2, out=nibbles.view(shape))
    levels = _buffer("levels", k * n, dtype).view(groups, group_size, n)
    q = nibbles.view(groups, group_size, n)
    sz = scales_and_zeros.to(torch.float32)
    scale = sz[..., 0].to(dtype).unsqueeze(1)
    offset = (sz[..., 1] - 8.0 * sz[..., 0]).to(dtype).unsqueeze(1)  # w = q * scale + (zero - 8 * scale)
    # cast the nibbles (exact), then one in-place multiply-add: addcmul straight from uint8 takes a slow mixed-dtype
    # path (bf16 6144x2048: 7.5 -> 3.1 ms, bitwise the same; fp32 2.9 -> 2.2 ms, one rounding instead of two)
    levels.copy_(q)
    torch.addcmul(offset, levels, scale, out=levels)
    return levels.view(k, n)
