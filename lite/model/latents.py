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


#: A linear latent -> RGB map for previews: the coefficients published for the SDXL VAE (ComfyUI's
#: latent2rgb), whose 4-channel latent space and 0.13025 scale Ovis-U1's VAE shares. An approximation:
#: enough to watch a run converge, never used for an output.
PREVIEW_RGB_FACTORS = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
                       (-0.3165, -0.2492, -0.2188))
PREVIEW_RGB_BIAS = (0.1084, -0.0175, -0.0011)


def preview_rgb(latent: torch.Tensor) -> torch.Tensor:
    """[1, 4, h, w] scaled latent -> [h, w, 3] uint8, with no VAE (one 4x3 matrix per pixel)."""
    factors = torch.tensor(PREVIEW_RGB_FACTORS, dtype=torch.float32, device=latent.device)
    bias = torch.tensor(PREVIEW_RGB_BIAS, dtype=torch.float32, device=latent.device)
    rgb = torch.einsum("chw,cr->hwr", latent[0].float(), factors) + bias
    return ((rgb.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).cpu()
