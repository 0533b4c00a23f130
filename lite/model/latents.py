"""Latent bookkeeping for Yak: noise, 2x2 packing, position ids, and the uint8 conversion."""

from __future__ import annotations

import torch

LATENT_CHANNELS = 4


def latent_noise(height: int, width: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[1, 4, 2*ceil(H/16), 2*ceil(W/16)] from a fresh generator on `device`, drawn in `dtype` (spec §3.8)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (1, LATENT_CHANNELS, 2 * -(-height // 16), 2 * -(-width // 16))
    return torch.randn(shape, generator=gen, device=device, dtype=dtype)


def pack(latent: torch.Tensor) -> torch.Tensor:
    """b c (h 2) (w 2) -> b (h w) (c 2 2): feature index c*4 + ph*2 + pw."""
    b, c, h, w = latent.shape
    x = latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of `pack` for a grid of rows x cols tokens."""
    b, _, f = tokens.shape
    c = f // 4
    x = tokens.view(b, rows, cols, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, rows * 2, cols * 2)


def image_ids(rows: int, cols: int, index: int = 0, device: torch.device | None = None) -> torch.Tensor:
    """[1, rows*cols, 3] float32 ids (index, r, c) in raster order; index 1 marks a condition image."""
    r = torch.arange(rows, dtype=torch.float32).view(rows, 1).expand(rows, cols)
    c = torch.arange(cols, dtype=torch.float32).view(1, cols).expand(rows, cols)
    ids = torch.stack([torch.full_like(r, float(index)), r, c], -1).reshape(1, rows * cols, 3)
    return ids.to(device) if device is not None else ids


def to_uint8(decoded: torch.Tensor) -> torch.Tensor:
    """[1, 3, H, W] in about [-1, 1] -> [H, W, 3] uint8, truncating 127.5*(x+1) as the reference does."""
    return (127.5 * (decoded.float().clamp(-1, 1) + 1.0)).to(torch.uint8)[0].permute(1, 2, 0).contiguous()
