"""diffusers' AutoencoderKL decode, bit for bit, holding fewer full-resolution maps at once (CPU).

`vae.decode` at 1024x1024 in fp32 holds about 7.8 full-resolution 128-channel maps (512 MiB each) at its peak:
every ResNet block keeps its input, its GroupNorm output and its SiLU output alive together, and every 3x3
convolution makes two more copies inside oneDNN (the input and the output reordered to its blocked layout).
This runs the same modules, with the same kernels, on the same values, and only changes what is alive:

* each intermediate is dropped as soon as it is consumed (a ResNet block's shortcut is taken first, so its
  input can go);
* GroupNorm runs a few groups at a time and writes back in place: a group's statistics and its
  normalisation read only that group's channels (torch's CPU kernel loops over groups independently);
* SiLU and the residual add run in place (the same elementwise kernels; a + b == b + a exactly);
* convolutions run in horizontal strips of about `STRIP_BYTES`, each strip reading its halo rows from the real
  input, so oneDNN's reordered copies are strip-sized; every output row sums the same products in the same
  order as the whole-image call. The nearest 2x upsampling is done strip by strip too (it copies values).

tests/runtime/test_lean_vae.py checks the output bitwise against `vae.decode` and the peak against a count of
the maps; `lite.model.memory_profile.lean_decode_activation` plans it. Anything this does not recognise (a
latent diffusers would tile, a batch, a hooked VAE, another block type) falls back to `vae.decode`;
`lean_decode_supported` says which.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lite.model.memory_profile import VAE_STRIP_BYTES

#: Bytes of input a convolution or GroupNorm step reads at once: bounds the strip-sized temporaries.
STRIP_BYTES = VAE_STRIP_BYTES


def lean_decode_supported(vae: Any, z: torch.Tensor) -> bool:
    """Whether `lean_decode(vae, z)` runs the decoder itself (else it is `vae.decode`)."""
    dec = getattr(vae, "decoder", None)
    tiles = getattr(vae, "use_tiling", False) and max(z.shape[-2:]) > getattr(vae, "tile_latent_min_size", 0)
    if (z.device.type != "cpu" or z.dim() != 4 or z.shape[0] != 1 or dec is None or vae.training or tiles
            or type(dec).__name__ != "Decoder" or not _plain_modules(vae, z.dtype)):
        return False
    if not (isinstance(dec.conv_norm_out, nn.GroupNorm) and isinstance(dec.conv_act, nn.SiLU)
            and _conv_ok(dec.conv_out)):
        return False
    for block in dec.up_blocks:
        if type(block).__name__ != "UpDecoderBlock2D" or not all(_resnet_ok(r) for r in block.resnets):
            return False
        if block.upsamplers is not None and not all(_upsampler_ok(u) for u in block.upsamplers):
            return False
    return True


@torch.no_grad()
def lean_decode(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """`vae.decode(z).sample`, bitwise, with fewer full-resolution maps alive at once."""
    if not lean_decode_supported(vae, z):
        return vae.decode(z).sample
    dec = vae.decoder
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    held = [dec.mid_block(dec.conv_in(z), None)]  # latent resolution: small
    del z
    for block in dec.up_blocks:
        for resnet in block.resnets:
            _resnet(resnet, held)
        for upsampler in block.upsamplers or ():
            held.append(_conv_strips(upsampler.conv, held.pop(), upsample=True))
    x = held.pop()
    _group_norm_(x, dec.conv_norm_out)
    F.silu(x, inplace=True)
    return _conv_strips(dec.conv_out, x)


def _plain_modules(vae: nn.Module, dtype: torch.dtype) -> bool:
    """Every module runs as its class defines it, on CPU tensors of `dtype`: no forward replaced (paging, fp32
    compute over bf16 storage, packed kernels: `offload.registry`), no torch or accelerate hook. Calling their
    kernels directly would skip what such a wrapper does."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    post = getattr(vae, "post_quant_conv", None)
    if hasattr(vae, "_hf_hook"):
        return False
    for module in [*vae.decoder.modules(), *(post.modules() if post is not None else ())]:
        if ("forward" in module.__dict__ or module._forward_hooks or module._forward_pre_hooks
                or hasattr(module, "_hf_hook")):
            return False
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if t.device.type != "cpu" or (t.is_floating_point() and t.dtype != dtype):
                return False
    return True


def _conv_ok(conv: Any) -> bool:
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and isinstance(conv.padding, tuple)
            and conv.kernel_size[0] == 2 * conv.padding[0] + 1 and conv.kernel_size[1] == 2 * conv.padding[1] + 1)


def _resnet_ok(r: Any) -> bool:
    return (type(r).__name__ == "ResnetBlock2D" and r.upsample is None and r.downsample is None
            and r.time_emb_proj is None and r.time_embedding_norm in ("default", "group")
            and isinstance(r.nonlinearity, nn.SiLU) and isinstance(r.norm1, nn.GroupNorm)
            and isinstance(r.norm2, nn.GroupNorm) and r.norm1.affine and r.norm2.affine
            and _conv_ok(r.conv1) and _conv_ok(r.conv2)
            and (r.conv_shortcut is None or _conv_ok(r.conv_shortcut)))


def _upsampler_ok(u: Any) -> bool:
    return (type(u).__name__ == "Upsample2D" and u.norm is None and not u.use_conv_transpose and u.interpolate
            and u.use_conv and u.name == "conv" and _conv_ok(u.conv))


def _resnet(r: Any, held: list[torch.Tensor]) -> None:
    """ResnetBlock2D.forward (no time embedding) on `held`'s tensor, which it consumes; leaves the output there."""
    x = held.pop()
    if r.conv_shortcut is not None:
        shortcut = _conv_strips(r.conv_shortcut, x)
        _group_norm_(x, r.norm1)  # the input is only needed for the shortcut, taken: normalise it in place
        h = x
    else:
        shortcut = x  # the identity shortcut keeps the input; the norm needs its own tensor
        h = r.norm1(x)
    del x
    F.silu(h, inplace=True)
    h = _conv_strips(r.conv1, h)
    _group_norm_(h, r.norm2)
    F.silu(h, inplace=True)
    h = r.dropout(h)  # identity in eval
    h = _conv_strips(r.conv2, h)
    out = shortcut.add_(h)  # (input + hidden): the same sum, into the shortcut's tensor
    del h, shortcut
    if r.output_scale_factor != 1:
        out.div_(r.output_scale_factor)
    held.append(out)


def _group_norm_(x: torch.Tensor, norm: nn.GroupNorm) -> None:
    """`x = norm(x)` in place, a few groups at a time (each group's statistics read only its own channels)."""
    groups, channels = norm.num_groups, x.shape[1]
    per_group = channels // groups
    step = max(1, STRIP_BYTES // max(1, x[0, :per_group].numel() * x.element_size()))
    for g0 in range(0, groups, step):
        c0, c1 = g0 * per_group, min(groups, g0 + step) * per_group
        part = x[:, c0:c1]
        part.copy_(F.group_norm(part, (c1 - c0) // per_group, norm.weight[c0:c1], norm.bias[c0:c1], norm.eps))


def _conv_strips(conv: nn.Conv2d, x: torch.Tensor, upsample: bool = False) -> torch.Tensor:
    """`conv(x)` (of `x` upsampled 2x nearest when `upsample`), in row strips where oneDNN runs every strip.

    Not 1x1 convolutions: oneDNN's 1x1 kernel blocks its channel sum by the number of pixels, so a strip would
    round differently (measured); they run whole."""
    n, c, hin, win = x.shape
    height, width = (2 * hin, 2 * win) if upsample else (hin, win)
    pad_h, pad_w = conv.padding
    rows = max(1, STRIP_BYTES // max(1, c * width * x.element_size()))
    rows = -(-height // -(-height // rows))  # as many strips, of even heights
    strips = [(r0, min(height, r0 + rows)) for r0 in range(0, height, rows)]
    plans = [_strip_plan(r0, r1, height, pad_h) for r0, r1 in strips]
    shapes = [(b - a, ph) for a, b, ph in plans]
    if len(strips) == 1 or conv.kernel_size == (1, 1) or not _all_onednn(conv, x, (n, c, height, width), shapes):
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if upsample else x)
    out = torch.empty(n, conv.out_channels, height, width, dtype=x.dtype, device=x.device)
    for (r0, r1), (a, b, ph) in zip(strips, plans):
        if upsample:
            s0, s1 = a // 2, (b + 1) // 2
            strip = F.interpolate(x[:, :, s0:s1], scale_factor=2.0, mode="nearest")[:, :, a - 2 * s0:b - 2 * s0]
        else:
            strip = x[:, :, a:b]
        y = F.conv2d(strip.contiguous(), conv.weight, conv.bias, 1, (ph, pad_w))
        first = a + pad_h - ph  # the full-image row of y's first row
        out[:, :, r0:r1].copy_(y[:, :, r0 - first:r1 - first])
        del strip, y
    return out


def _strip_plan(r0: int, r1: int, height: int, pad_h: int) -> tuple[int, int, int]:
    """Input rows [a, b) that output rows [r0, r1) read, and the zero padding in height the strip's call takes:
    only where the strip meets the image's top or bottom, as in the whole-image call."""
    a, b = max(0, r0 - pad_h), min(height, r1 + pad_h)
    return a, b, pad_h if (a == 0 or b == height) else 0


def _all_onednn(conv: nn.Conv2d, x: torch.Tensor, full: tuple[int, int, int, int],
                strips: list[tuple[int, int]]) -> bool:
    """Whether torch sends the whole-image call and every strip's call to oneDNN. Its direct kernels compute each
    output row alone, summing the same products in the same order; torch's own im2col path (which it picks for
    small inputs, or for bf16 on CPUs without native bf16) multiplies matrices whose blocking follows the size."""
    select = getattr(torch._C, "_select_conv_backend", None)
    onednn = getattr(getattr(torch._C, "_ConvBackend", None), "Mkldnn", None)
    if select is None or onednn is None:
        return False
    n, c, height, width = full
    pad_h, pad_w = conv.padding
    w = conv.weight
    shapes = {(height, pad_h)} | set(strips)
    return all(select(x.new_empty(n, c, rows, width), w, conv.bias, [1, 1], [ph, pad_w], [1, 1], False, [0, 0], 1,
                      None) == onednn for rows, ph in shapes)
