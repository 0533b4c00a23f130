"""The lean CPU VAE decode: bitwise diffusers' `AutoencoderKL.decode`, with fewer full-resolution maps alive.

Equality is `torch.equal` against the plain `vae.decode` of the same seeded VAE and latent (several sizes, fp32
and bf16, strips forced small so that every convolution is cut). The peak is measured in a child process as
the rise of the kernel's VmHWM over the RSS before each decode, with malloc returning every block of 1 MiB
or more to the kernel at free, and compared with a count of the maps the decoder's shapes force.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lite.runtime import lean_vae
from lite.runtime.lean_vae import lean_decode, lean_decode_supported

diffusers = pytest.importorskip("diffusers")


def _vae(channels: list[int], dtype: torch.dtype, groups: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    n = len(channels)
    vae = diffusers.AutoencoderKL(block_out_channels=channels, down_block_types=["DownEncoderBlock2D"] * n,
                                  up_block_types=["UpDecoderBlock2D"] * n, latent_channels=4,
                                  norm_num_groups=groups, layers_per_block=2)
    return vae.eval().to(dtype)


@pytest.mark.parametrize(("channels", "dtype", "latent"), [
    ([16, 32, 32], torch.float32, (24, 32)),
    ([16, 32, 32], torch.float32, (27, 19)),  # odd latent sides: strips end mid-way through a 2x2 block
    ([16, 32, 32], torch.bfloat16, (24, 24)),
    ([16, 32], torch.float32, (37, 41)),      # two blocks, the last one with a 1x1 shortcut
])
def test_lean_decode_is_bitwise_the_plain_decode(channels, dtype, latent, monkeypatch) -> None:
    vae = _vae(channels, dtype)
    z = torch.randn(1, 4, *latent, generator=torch.Generator().manual_seed(1)).to(dtype)
    # Strips of about 24 rows at full resolution: the 3x3 convolutions and GroupNorms run in several pieces.
    monkeypatch.setattr(lean_vae, "STRIP_BYTES", 24 * channels[0] * latent[1] * 2 ** (len(channels) - 1)
                        * z.element_size())
    cut = []  # the convolutions that ran in strips
    all_onednn = lean_vae._all_onednn
    monkeypatch.setattr(lean_vae, "_all_onednn", lambda *a: all_onednn(*a) and not cut.append(a[0]))
    assert lean_decode_supported(vae, z)
    with torch.no_grad():
        expected = vae.decode(z).sample
        got = lean_decode(vae, z)
    assert len(cut) >= 6  # the 3x3 convolutions at the two finest resolutions at least
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)


def test_what_it_does_not_recognise_is_the_plain_decode() -> None:
    vae = _vae([16, 32], torch.float32)
    z = torch.randn(2, 4, 8, 8)
    assert not lean_decode_supported(vae, z)  # a batch of two
    vae.enable_tiling()
    vae.tile_latent_min_size = 6
    assert not lean_decode_supported(vae, z[:1])  # diffusers decodes this one in tiles
    vae.tile_latent_min_size = 8
    assert lean_decode_supported(vae, z[:1])  # and this one whole
    vae.disable_tiling()
    vae.decoder.up_blocks[0].resnets[0].nonlinearity = torch.nn.GELU()  # an activation it does not run itself
    assert not lean_decode_supported(vae, z[:1])
    with torch.no_grad():
        assert torch.equal(lean_decode(vae, z), vae.decode(z).sample)
        assert torch.equal(lean_decode(vae, z[:1]), vae.decode(z[:1]).sample)


def test_a_wrapped_forward_is_left_to_the_plain_decode() -> None:
    """fp32 compute over bf16 storage (lite.runtime.cpu.compute) swaps each layer's weights inside its forward:
    calling the kernels directly would skip it, so such a VAE decodes through `vae.decode`."""
    from lite.runtime.cpu.compute import use_fp32_compute

    vae = _vae([16, 32], torch.bfloat16)
    z = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    assert lean_decode_supported(vae, z)
    with use_fp32_compute(vae):
        assert not lean_decode_supported(vae, z)
        with torch.no_grad():
            assert torch.equal(lean_decode(vae, z), vae.decode(z).sample)
    handle = vae.decoder.conv_out.register_forward_hook(lambda *a: None)
    assert not lean_decode_supported(vae, z)
    handle.remove()


def test_the_cpu_preset_decodes_through_it(tiny_dir) -> None:
    from lite.runtime.pipeline import OvisPipeline

    pipe = OvisPipeline.from_pretrained(tiny_dir, device="cpu", preset="cpu", progress=False)
    z = torch.randn(1, 4, 8, 8, dtype=pipe.vae.dtype)
    assert pipe.vae.dtype == torch.float32 and lean_decode_supported(pipe.vae, z)


CHILD = """
import json, sys, torch
from pathlib import Path
import diffusers
from lite.runtime import lean_vae
torch.set_num_threads(2)
def status(field):
    return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines()
                if l.startswith(field + ":"))
def peak(fn):
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    out = fn()
    return out, status("VmHWM") - before
torch.manual_seed(0)
vae = diffusers.AutoencoderKL(block_out_channels=[16, 32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 4,
                              up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=8).eval()
lean_vae.STRIP_BYTES = 1 << 20
z = torch.randn(1, 4, 48, 48)
with torch.no_grad():
    vae.decode(z[:, :, :8, :8]); lean_vae.lean_decode(vae, z[:, :, :8, :8])  # oneDNN's kernels, once
    plain, plain_peak = peak(lambda: vae.decode(z).sample)
    lean, lean_peak = peak(lambda: lean_vae.lean_decode(vae, z))
print(json.dumps({"plain": plain_peak, "lean": lean_peak, "equal": torch.equal(plain, lean)}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's VmHWM reset")
def test_lean_decode_holds_fewer_full_resolution_maps() -> None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")  # freed blocks >= 1 MiB go back to the kernel
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["equal"]
    c0, c1 = 16, 32  # channels of the last up block and of the block before it; output 384x384
    full_map = c0 * 384 * 384 * 4
    # Plain: the last upsampler's 3x3 convolution alone holds its nearest-upsampled input, oneDNN's blocked
    # copy of it and its blocked output (c1 channels each), beside the block's input at half resolution.
    maps = {k: r[k] / full_map for k in ("plain", "lean")}
    assert r["plain"] >= (3 * c1 + c1 / 4) / c0 * full_map, maps
    # Lean: the peak is the last block's 1x1 shortcut, which runs whole: its input (c1 channels), oneDNN's
    # blocked copy of it and the blocked output (c0 channels); strips, oneDNN's scratchpads and its kernels for
    # each strip shape add a few MiB (measured 0.3 to 0.9 maps of 9 MiB here; 5.01 maps of 512 MiB at 1024x1024).
    assert r["lean"] <= (2 * c1 + c0) / c0 * full_map + 16 * (1 << 20), maps
    assert r["lean"] <= 0.8 * r["plain"], maps
