"""Parity with the reference on configs other than the real one (issue 26 items 18-19): the token refiner's MLP
is 4x wide whatever `mlp_ratio` says (spec §3.6), and the first resize of a generation/edit canvas uses
smart_resize's own factor 28 whatever the ViT's patch size (spec §4). Expectations are computed here, from the
spec's formulas, not by the code under test."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from lite.model.config import PreprocessorConfig, YakConfig
from lite.model.modeling_yak import DoubleStreamXBlock, SingleTokenRefiner
from lite.model.processing import generation_view_size, generation_vision_input, preprocess_image

# mlp_ratio 2: the MMDiT blocks are 2x wide, the refiner stays 4x.
YAK = YakConfig(hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1, mlp_ratio=2.0, axes_dim=(8, 12, 12),
                context_in_dim=48, vec_in_dim=64, refiner_depth=2)


def _seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def _refiner_by_the_spec(m: SingleTokenRefiner, txt: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """spec §3.6 step by step, reading the weights by their checkpoint names."""
    sd = m.state_dict()

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    c = lin(F.silu(lin(txt.mean(dim=1), "c_embedder.linear_1")), "c_embedder.linear_2")
    x = torch.cat([sd["cls_token"].expand(txt.shape[0], -1, -1), lin(txt, "input_embedder")], dim=1)
    b, n, d = x.shape
    for i in range(YAK.refiner_depth):
        p = f"individual_token_refiner.blocks.{i}"
        g_msa, g_mlp = lin(F.silu(c), f"{p}.adaLN_modulation.1").chunk(2, dim=1)
        a = F.layer_norm(x, (d,), sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"], eps=1e-6)
        qkv = lin(a, f"{p}.self_attn_qkv").view(b, n, 3, heads, d // heads)  # (K, H, D), K outermost
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
        x = x + lin(att.transpose(1, 2).reshape(b, n, d), f"{p}.self_attn_proj") * g_msa[:, None]
        h = F.layer_norm(x, (d,), sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"], eps=1e-6)
        x = x + lin(F.silu(lin(h, f"{p}.mlp.fc1")), f"{p}.mlp.fc2") * g_mlp[:, None]
    return x[:, 1:], x[:, 0]


def test_the_refiner_mlp_is_four_wide_whatever_mlp_ratio_says() -> None:
    refiner = _seeded(SingleTokenRefiner(YAK), 0)
    block = DoubleStreamXBlock(YAK)
    for b in refiner.individual_token_refiner.blocks:
        assert tuple(b.mlp.fc1.weight.shape) == (4 * 64, 64) and tuple(b.mlp.fc2.weight.shape) == (64, 4 * 64)
    assert tuple(block.img_mlp[0].weight.shape) == (2 * 64, 64)  # the MMDiT blocks do follow mlp_ratio
    txt = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fea, y = refiner(txt)
        want_fea, want_y = _refiner_by_the_spec(refiner, txt, heads=2 * YAK.num_heads)
    torch.testing.assert_close(fea, want_fea, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, want_y, atol=1e-5, rtol=1e-5)


# patch 8 x stride 2: the ViT's factor is 16, the first resize's stays 28.
PP = PreprocessorConfig(patch_size=8, hidden_stride=2, min_pixels=12544, max_pixels=50176)


def test_the_first_canvas_resize_uses_factor_28_whatever_the_patch_size() -> None:
    # smart_resize(120, 200, factor 28, min 3136, max 12544), spec §3.1 step 2: round -> 112 x 196 = 21952 > max,
    # so beta = sqrt(120 * 200 / 12544) and each side is floor(side / beta / 28) * 28 -> 84 x 140.
    beta = math.sqrt(120 * 200 / 12544)
    assert (math.floor(120 / beta / 28) * 28, math.floor(200 / beta / 28) * 28) == (84, 140)
    assert generation_view_size(120, 200, PP) == (84, 140)
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8))
    got = generation_vision_input(img, PP)
    want = preprocess_image(img.resize((140, 84), Image.Resampling.BICUBIC), PP)
    assert torch.equal(got.grid_thws, want.grid_thws) and torch.equal(got.pixel_values, want.pixel_values)
    # The ViT's own factor would have given 80 x 144 first (same grid after step 3, other pixels).
    other = preprocess_image(img.resize((144, 80), Image.Resampling.BICUBIC), PP)
    assert torch.equal(other.grid_thws, want.grid_thws) and not torch.equal(other.pixel_values, want.pixel_values)
