"""The VAE's weights load without diffusers, and the AutoencoderKL built around them later is diffusers' own."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from lite.model.config import load_config, parse_config
from lite.model.deferred_vae import DeferredAutoencoderKL
from lite.model.tiny import real_config_template, tiny_config_dict

VAE_PREFIX = "visual_generator.vae."


def _variant_vae() -> dict:
    """A VAE no shipped checkpoint has: 3 levels, 2 layers per block, no mid-block attention, 8 groups."""
    vae = dict(parse_config(real_config_template()).vae)
    vae.update(block_out_channels=[32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 3,
               up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=2, norm_num_groups=8,
               mid_block_add_attention=False)
    return vae


@pytest.mark.parametrize("which", ["real", "tiny", "variant"])
def test_the_tree_is_diffusers_autoencoder_and_the_build_reuses_its_layers(which: str) -> None:
    # The independent computation: diffusers' own AutoencoderKL from the same config.
    from diffusers import AutoencoderKL

    vae_cfg = {"real": lambda: parse_config(real_config_template()).vae,
               "tiny": lambda: parse_config(tiny_config_dict()).vae, "variant": _variant_vae}[which]()
    with torch.device("meta"):
        theirs = AutoencoderKL.from_config(vae_cfg)
        deferred = DeferredAutoencoderKL(vae_cfg)
    assert [(n, tuple(p.shape)) for n, p in deferred.named_parameters()] == \
        [(n, tuple(p.shape)) for n, p in theirs.named_parameters()]
    assert list(deferred.state_dict()) == list(theirs.state_dict())
    built = deferred.autoencoder()  # checks every layer's type and arguments against diffusers' (raises otherwise)
    assert isinstance(built, AutoencoderKL) and deferred.autoencoder() is built
    ours = dict(deferred.named_parameters())
    assert all(p is ours[n] for n, p in built.named_parameters())  # the same tensors: no copy
    assert list(deferred.state_dict()) == list(built.state_dict())
    assert not any(m is built for m in deferred.modules())  # not a submodule: the state dict stays as it was


def test_tiling_set_before_the_build_is_applied_to_it() -> None:
    from lite.runtime.vae import set_vae_tiling

    deferred = DeferredAutoencoderKL(parse_config(tiny_config_dict()).vae)
    set_vae_tiling(deferred, 64, 0.5)
    built = deferred.autoencoder()
    assert (built.use_tiling, built.tile_sample_min_size, built.tile_latent_min_size, built.tile_overlap_factor) == \
        (True, 64, 8, 0.5)


def test_a_pipeline_loaded_for_understanding_decodes_with_the_checkpoint_weights(tiny_dir) -> None:
    from diffusers import AutoencoderKL

    from lite.runtime.pipeline import OvisPipeline

    pipe = OvisPipeline.from_pretrained(tiny_dir, device="cpu", progress=False)
    pipe.understand([], "What is it?", max_new_tokens=2)
    assert not pipe.model.visual_generator.vae.built  # understanding never built it
    # Independent: diffusers' AutoencoderKL with the checkpoint's VAE tensors, read straight from the shard.
    config = load_config(tiny_dir)
    reference = AutoencoderKL.from_config(config.vae).eval()
    state = {}
    for shard in sorted(tiny_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            state.update({k[len(VAE_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(VAE_PREFIX)})
    reference.load_state_dict({k: v.to(pipe.vae.dtype) for k, v in state.items()})
    packed = torch.randn(1, 4 * 4, 16, generator=torch.Generator().manual_seed(3))
    image = pipe.decode(packed, 4, 4)
    assert pipe.model.visual_generator.vae.built
    from lite.runtime.vae import decode_latent

    expected = decode_latent(reference, packed, 4, 4, config.vae_scaling_factor)
    assert image.tobytes() == expected.tobytes()
