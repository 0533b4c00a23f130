"""The VAE's weights without diffusers: diffusers' AutoencoderKL is built around them when an image task first
runs it.

Why: importing diffusers pulls in bitsandbytes, and with it torch._dynamo and torch._inductor (seconds of
start-up), while understanding never runs the VAE. `DeferredAutoencoderKL` is AutoencoderKL's parameter tree
(same names, order, shapes, layer types and arguments: tested against diffusers), so loading, quantization
plans, sizes, paging units and the CPU plan's hooks all see the VAE as before. `autoencoder()` imports
diffusers once, builds an AutoencoderKL on `meta` and hands it this tree's own layers: the same modules, so the
same weights (no copy), with their hooks. The AutoencoderKL is not a submodule (the state dict is unchanged).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quant.backends.bnb import quiet_import_logs

#: diffusers' VAE norms and its attention's norm use this epsilon (AutoencoderKL's `resnet_eps`/`norm_eps`).
EPS = 1e-6
#: The tiling state `lite.runtime.vae.set_vae_tiling` sets; recorded here until the AutoencoderKL exists.
TILING_ATTRS = ("use_tiling", "tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")


def _children(**modules: nn.Module) -> nn.Module:
    parent = nn.Module()
    for name, module in modules.items():
        parent.add_module(name, module)
    return parent


def _resnet(c_in: int, c_out: int, groups: int) -> nn.Module:
    block = _children(norm1=nn.GroupNorm(groups, c_in, eps=EPS), conv1=nn.Conv2d(c_in, c_out, 3, padding=1),
                      norm2=nn.GroupNorm(groups, c_out, eps=EPS), conv2=nn.Conv2d(c_out, c_out, 3, padding=1))
    if c_in != c_out:
        block.add_module("conv_shortcut", nn.Conv2d(c_in, c_out, 1))
    return block


def _mid_block(channels: int, groups: int, attention: bool) -> nn.Module:
    mid = nn.Module()
    if attention:  # one head of width `channels`, registered before the resnets
        mid.attentions = nn.ModuleList([_children(
            group_norm=nn.GroupNorm(groups, channels, eps=EPS), to_q=nn.Linear(channels, channels),
            to_k=nn.Linear(channels, channels), to_v=nn.Linear(channels, channels),
            to_out=nn.ModuleList([nn.Linear(channels, channels)]))])
    mid.resnets = nn.ModuleList([_resnet(channels, channels, groups), _resnet(channels, channels, groups)])
    return mid


def _sampling_block(c_in: int, c_out: int, layers: int, groups: int, resample: str | None) -> nn.Module:
    block = _children(resnets=nn.ModuleList(_resnet(c_in if i == 0 else c_out, c_out, groups) for i in range(layers)))
    if resample == "downsamplers":  # diffusers pads asymmetrically itself, then a stride-2 conv without padding
        block.add_module(resample, nn.ModuleList([_children(conv=nn.Conv2d(c_out, c_out, 3, stride=2))]))
    elif resample == "upsamplers":
        block.add_module(resample, nn.ModuleList([_children(conv=nn.Conv2d(c_out, c_out, 3, padding=1))]))
    return block


def _own_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


class DeferredAutoencoderKL(nn.Module):
    """AutoencoderKL's parameter tree from its config; `autoencoder()` is the runnable diffusers model."""

    def __init__(self, vae: dict[str, Any]) -> None:
        super().__init__()
        object.__setattr__(self, "_vae_config", dict(vae))
        object.__setattr__(self, "_autoencoder", None)
        channels = [int(c) for c in vae.get("block_out_channels", [64])]
        layers, groups = int(vae.get("layers_per_block", 1)), int(vae.get("norm_num_groups", 32))
        latent, attention = int(vae.get("latent_channels", 4)), bool(vae.get("mid_block_add_attention", True))
        last = len(channels) - 1
        down = nn.ModuleList(_sampling_block(channels[max(i - 1, 0)], c, layers, groups,
                                             None if i == last else "downsamplers") for i, c in enumerate(channels))
        self.encoder = _children(conv_in=nn.Conv2d(int(vae.get("in_channels", 3)), channels[0], 3, padding=1),
                                 down_blocks=down, mid_block=_mid_block(channels[-1], groups, attention),
                                 conv_norm_out=nn.GroupNorm(groups, channels[-1], eps=EPS),
                                 conv_out=nn.Conv2d(channels[-1], 2 * latent, 3, padding=1))
        up_channels = channels[::-1]
        up = nn.ModuleList(_sampling_block(up_channels[max(i - 1, 0)], c, layers + 1, groups,
                                           None if i == last else "upsamplers") for i, c in enumerate(up_channels))
        self.decoder = _children(conv_in=nn.Conv2d(latent, channels[-1], 3, padding=1), up_blocks=up,
                                 mid_block=_mid_block(channels[-1], groups, attention),
                                 conv_norm_out=nn.GroupNorm(groups, channels[0], eps=EPS),
                                 conv_out=nn.Conv2d(channels[0], int(vae.get("out_channels", 3)), 3, padding=1))
        if vae.get("use_quant_conv", True):
            self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        if vae.get("use_post_quant_conv", True):
            self.post_quant_conv = nn.Conv2d(latent, latent, 1)

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype, as diffusers' `ModelMixin.dtype` reads it (the first floating parameter)."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def built(self) -> bool:
        return self._autoencoder is not None

    def enable_tiling(self) -> None:
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def autoencoder(self) -> Any:
        """diffusers' AutoencoderKL running this tree's layers (built, and diffusers imported, on first call)."""
        if self._autoencoder is None:
            object.__setattr__(self, "_autoencoder", self._build())
        return self._autoencoder

    def _build(self) -> Any:
        quiet_import_logs()  # diffusers imports bitsandbytes, which would log a warning nothing here needs
        # diffusers takes seconds to import (bitsandbytes, torch._dynamo, torch._inductor): only for an image task.
        from diffusers import AutoencoderKL

        with torch.device("meta"):
            vae = AutoencoderKL.from_config(self._vae_config)
        ours = {name: m for name, m in self.named_modules() if _own_state(m)}
        theirs = {name: m for name, m in vae.named_modules() if _own_state(m)}
        if list(ours) != list(theirs):
            raise RuntimeError(f"diffusers' AutoencoderKL has another layer tree than ovis-lite's VAE: "
                               f"{sorted(set(ours) ^ set(theirs))[:4]}")
        for name, layer in ours.items():
            other = theirs[name]
            if type(other) is not type(layer) or other.extra_repr() != layer.extra_repr():
                raise RuntimeError(f"diffusers' AutoencoderKL builds {name} as {type(other).__name__}"
                                   f"({other.extra_repr()}), ovis-lite as {type(layer).__name__}({layer.extra_repr()})")
            vae.set_submodule(name, layer)
        vae.train(self.training)
        for attr in TILING_ATTRS:
            if attr in self.__dict__:
                setattr(vae, attr, self.__dict__[attr])
        return vae


__all__ = ["DeferredAutoencoderKL"]
