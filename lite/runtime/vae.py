"""The VAE side of a run: tiling, encoding an edit's source image, decoding a latent to pixels (spec §3.8)."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from lite.errors import InputError
from lite.model import latents
from lite.model.processing import vae_pixels
from lite.runtime.lean_vae import lean_decode


def set_vae_tiling(vae: Any, tile: int | None, overlap: float = 0.25) -> None:
    """Decode and encode in overlapping, blended tiles of `tile` px once an image side exceeds it.

    Uses diffusers' AutoencoderKL tiling. Tiles are normalised on their own (GroupNorm statistics
    and the mid-block attention are per tile), so tiling trades exactness for a bounded peak:
    it is off unless a preset or the user asks for it.
    """
    if tile is None:
        vae.disable_tiling()
        return
    if tile < 64 or tile % 8:
        raise InputError(f"VAE tile must be a multiple of 8 and >= 64 px, got {tile}")
    vae.enable_tiling()
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // 8
    vae.tile_overlap_factor = overlap


@torch.no_grad()
def encode_image(vae: Any, image: Image.Image, scaling: float, mode: str, seed: int, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """Packed, scaled latent of an image already at the output size: the posterior mean, or a seeded sample."""
    pixels = vae_pixels(image).to(device, vae.dtype)
    dist = vae.encode(pixels).latent_dist
    if mode == "mean":
        z = dist.mean
    else:
        gen = torch.Generator(device=device).manual_seed(seed)
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen, device=device, dtype=dist.mean.dtype)
    return latents.pack(z * scaling).to(dtype)


@torch.no_grad()
def decode_latent(vae: Any, packed: torch.Tensor, rows: int, cols: int, scaling: float) -> Image.Image:
    """Unpack, divide by the scaling factor (no shift), decode, clamp and truncate to uint8.

    On a CPU the decoder runs through `lean_decode`: the same pixels, bit for bit, with about 5 full-resolution
    maps alive at the peak instead of about 8 (docs/BENCHMARKS.md, "Host memory on CPU")."""
    z = latents.unpack(packed.float(), rows, cols) / scaling
    decoded = lean_decode(vae, z.to(vae.dtype))
    return Image.fromarray(latents.to_uint8(decoded).cpu().numpy())
