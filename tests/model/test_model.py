"""Model pieces checked against independent computations written from the spec."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lite.model.config import PreprocessorConfig, load_config
from lite.model.sizes import inspect_config
from lite.model.latents import image_ids, pack, unpack
from lite.model.modeling_aimv2 import apply_rotary_rotate_half, indicator_rows, vision_rope_angles
from lite.model.modeling_yak import apply_rope, rope_table, timestep_embedding
from lite.model.processing import edit_output_size, generation_vision_input, patchify, preprocess_image, smart_resize
from lite.sampling import time_shift_mu

from tests.conftest import REAL_CONFIG


# -- sizes (spec §3.1, §4, §5) -------------------------------------------------------------------

@pytest.mark.parametrize("hw, expected", [((1024, 1024), (1036, 1036)), ((1080, 1920), (1092, 1932)),
                                          ((4000, 3000), (1792, 1344))])
def test_smart_resize_understanding_examples(hw, expected):
    assert smart_resize(*hw, 28, 200704, 2408448) == expected


@pytest.mark.parametrize("hw, first, second", [((1024, 1024), (448, 448), (448, 448)),
                                               ((768, 1024), (364, 504), (392, 532)),
                                               ((720, 1280), (336, 588), (364, 616))])
def test_generation_image_sizes(hw, first, second):
    assert smart_resize(*hw, 28, 3136, 200704) == first
    assert smart_resize(*first, 28, 200704, 2408448) == second
    real = PreprocessorConfig()
    h, w = hw
    vis = generation_vision_input(Image.new("RGB", (w, h), "white"), real)
    assert vis.grid_thws.tolist() == [[1, second[0] // 14, second[1] // 14]]


@pytest.mark.parametrize("wh, expected", [((1024, 704), (1024, 704)), ((1024, 1024), (992, 992)),
                                          ((1920, 1080), (1312, 736)), ((3000, 2000), (1216, 800))])
def test_edit_output_sizes(wh, expected):
    assert edit_output_size(*wh) == expected


# -- patch order (spec §3.1 step 5) -------------------------------------------------------------

def test_patchify_emits_2x2_groups_channel_major():
    gh, gw = 4, 6
    pixels = torch.zeros(3, gh * 14, gw * 14)
    for r in range(gh):
        for c in range(gw):
            pixels[:, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = r * 100 + c
    pixels[1] += 0.5  # channel 1 marked to check channel-major flattening
    rows = patchify(pixels)
    expected_order = []
    for gr in range(gh // 2):
        for gc in range(gw // 2):
            for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
                expected_order.append((2 * gr + dr) * 100 + 2 * gc + dc)
    assert rows[:, 0].tolist() == expected_order
    assert torch.all(rows[:, 196:392] == rows[:, :1] + 0.5)


def test_pixel_values_are_clip_normalised():
    img = Image.fromarray(np.full((56, 84, 3), 200, dtype=np.uint8))
    pp = PreprocessorConfig(min_pixels=3136, max_pixels=12544)
    vis = preprocess_image(img, pp)
    for ch in range(3):
        expected = (np.float32(200 / 255) - np.float32(pp.image_mean[ch])) / np.float32(pp.image_std[ch])
        assert torch.allclose(vis.pixel_values[:, ch * 196], torch.tensor(float(expected)), atol=1e-6)


# -- RoPE (spec §3.2 step 3, §3.7 step 5) ---------------------------------------------------------

def test_vision_rope_matches_direct_formula():
    head_dim = 16
    grid = torch.tensor([[1, 2, 4]])
    angles = vision_rope_angles(grid, head_dim)
    x = torch.randn(8, 1, head_dim, dtype=torch.float64).float()
    out = apply_rotary_rotate_half(x, angles)
    order = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    for n, (row, col) in enumerate(order):
        theta = [row * 10000 ** (-2 * j / 8) for j in range(4)] + [col * 10000 ** (-2 * j / 8) for j in range(4)]
        v = x[n, 0].double().tolist()
        for i in range(8):  # dim i rotates with dim i + 8 by theta[i]
            c, s = math.cos(theta[i]), math.sin(theta[i])
            assert out[n, 0, i].item() == pytest.approx(v[i] * c - v[i + 8] * s, abs=1e-5)
            assert out[n, 0, i + 8].item() == pytest.approx(v[i + 8] * c + v[i] * s, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vision_rope_half_by_half_is_bitwise_the_reference_op_order(dtype):
    # Same machine, same elementwise kernels: (xf * cos + rotate_half(xf) * sin).to(dtype), the reference's
    # expression, must come out bit for bit; q and k stacked ([N, 2, H, D]) rotate with the same tables.
    from lite.model.modeling_aimv2 import apply_rotary, rotary_tables, rotate_half

    angles = vision_rope_angles(torch.tensor([[1, 8, 12]]), 32)
    x = (torch.randn(96, 3, 4, 32, generator=torch.Generator().manual_seed(3)) * 4).to(dtype)[:, :2]
    cos, sin = (t.view(96, 1, 1, 32) for t in rotary_tables(angles))
    xf = x.float()
    ref = (xf * cos + rotate_half(xf) * sin).to(dtype)
    assert torch.equal(apply_rotary(x, cos, sin), ref)
    heads = apply_rotary(x.permute(1, 2, 0, 3), *rotary_tables(angles))  # head-major, as the attention runs it
    assert heads.is_contiguous() and torch.equal(heads, ref.permute(1, 2, 0, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vision_rmsnorm_is_bitwise_the_reference_op_order(dtype):
    # Same machine, same reductions: fp32 normalisation, cast back, then the weight (AIMv2's order)
    from lite.model.modeling_aimv2 import RMSNorm

    gen = torch.Generator().manual_seed(5)
    norm = RMSNorm(64, 1e-5).to(dtype)
    norm.weight.data = torch.randn(64, generator=gen).to(dtype)
    x = (torch.randn(33, 64, generator=gen) * 3).to(dtype)
    xf = x.float()
    ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype) * norm.weight
    assert torch.equal(norm(x), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_projection_is_the_checkpoint_conv(dtype):
    # kernel = stride = patch: the conv is one dot product per (patch, output channel), checked in fp64
    from lite.model.modeling_aimv2 import PatchProjection

    gen = torch.Generator().manual_seed(4)
    proj = PatchProjection(3, 16, 14, 14, bias=True).to(dtype)
    patches = torch.randn(10, 3 * 14 * 14, generator=gen).to(dtype)
    conv = torch.nn.functional.conv2d(patches.double().view(10, 3, 14, 14), proj.weight.double(), proj.bias.double())
    ref = conv.flatten(1)
    mag = patches.double().abs() @ proj.weight.double().flatten(1).abs().t() + proj.bias.double().abs()
    eps = torch.finfo(dtype).eps
    assert ((proj(patches).double() - ref).abs() <= 2 * eps * mag).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vision_attention_is_per_image_softmax_on_the_fused_kernel(dtype):
    """Per image softmax(q k^T / sqrt(d)) v (spec §3.2), computed by PyTorch's fused CPU kernel:
    3-D inputs silently fall back to the math path, which was half the ViT's time."""
    from torch.profiler import profile

    from lite.model.config import VisionConfig
    from lite.model.modeling_aimv2 import Attention, rotary_tables

    torch.manual_seed(0)
    cfg = VisionConfig(hidden_size=32, num_attention_heads=2)
    attn = Attention(cfg).to(dtype)
    seqlens = [8, 4]
    x = torch.randn(sum(seqlens), 32).to(dtype)
    angles = torch.randn(sum(seqlens), 8)
    with profile() as prof:
        out = attn(x, rotary_tables(angles), seqlens)
    kernels = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" not in kernels, kernels
    q, k, v = attn.qkv(x).double().view(-1, 3, 2, 16).unbind(1)
    q = apply_rotary_rotate_half(q.to(dtype), angles).double()
    k = apply_rotary_rotate_half(k.to(dtype), angles).double()
    heads = []
    for rows in (slice(0, 8), slice(8, 12)):
        w = torch.einsum("nhd,mhd->hnm", q[rows], k[rows]) / 4.0
        heads.append(torch.einsum("hnm,mhd->nhd", w.softmax(-1), v[rows]).reshape(-1, 32))
    want = attn.proj.double()(torch.cat(heads))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(out.double(), want, atol=tol, rtol=tol)


def test_yak_rope_matches_direct_formula():
    axes = (4, 10, 10)
    ids = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, 5.0, 1.0]]])
    table = rope_table(ids, axes, 10000)
    q = torch.randn(1, 1, 3, 24)
    out = apply_rope(q, table)
    for n in range(3):
        pair = 0
        for axis, d in enumerate(axes):
            for j in range(d // 2):
                ang = ids[0, n, axis].item() * 10000 ** (-2 * j / d)
                z = complex(q[0, 0, n, 2 * pair], q[0, 0, n, 2 * pair + 1]) * complex(math.cos(ang), math.sin(ang))
                assert out[0, 0, n, 2 * pair].item() == pytest.approx(z.real, abs=1e-5)
                assert out[0, 0, n, 2 * pair + 1].item() == pytest.approx(z.imag, abs=1e-5)
                pair += 1
    assert torch.equal(out[0, 0, 0], q[0, 0, 0])  # text ids (0,0,0): identity


def test_rope_table_never_needs_float64_on_device():
    table = rope_table(torch.zeros(1, 2, 3), (4, 10, 10), 10000)
    assert table.dtype == torch.float32


# -- timestep embedding, schedule shift --------------------------------------------------------

@pytest.mark.parametrize("t", [0.0, 0.25, 0.731, 1.0])
def test_timestep_embedding_is_cos_first(t):
    emb = timestep_embedding(torch.tensor([t]))[0]
    for k in (0, 1, 17, 127):
        f = math.exp(-math.log(10000) * k / 128)
        assert emb[k].item() == pytest.approx(math.cos(1000 * t * f), abs=2e-4)
        assert emb[128 + k].item() == pytest.approx(math.sin(1000 * t * f), abs=2e-4)


def test_timestep_is_rounded_in_bf16():
    emb = timestep_embedding(torch.tensor([0.99358], dtype=torch.bfloat16)).float()
    expected = timestep_embedding(torch.tensor([992.0 / 1000]))  # 0.99358 -> 0.9921875 -> 992.0
    torch.testing.assert_close(emb, expected, atol=1e-2, rtol=0)


def test_mu_for_1024_square_and_512():
    assert time_shift_mu(4096) == pytest.approx(1.15)
    assert time_shift_mu(1024) == pytest.approx(0.63)


# -- packing, indicator rows, condition layout ---------------------------------------------------

def test_pack_layout_and_round_trip():
    lat = torch.randn(1, 4, 6, 8)
    packed = pack(lat)
    assert packed.shape == (1, 12, 16)
    for r, c, ch, ph, pw in [(0, 0, 0, 0, 0), (2, 3, 3, 1, 1), (1, 2, 2, 0, 1)]:
        assert packed[0, r * 4 + c, ch * 4 + ph * 2 + pw] == lat[0, ch, 2 * r + ph, 2 * c + pw]
    assert torch.equal(unpack(packed, 3, 4), lat)
    ids = image_ids(3, 4, index=1)
    assert ids[0, 7].tolist() == [1.0, 1.0, 3.0]


def test_indicator_rows_of_real_vocabulary():
    assert indicator_rows(65536) == [65531, 65532, 65533, 65534]


def test_generation_condition_layout(golden_model):
    """[final-norm(last layer) ; raw residual after the second-to-last layer], in that order."""
    llm = golden_model.llm.model
    embeds = torch.randn(1, 7, golden_model.config.hidden_size)
    outputs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for layer in llm.layers]
    cond = golden_model.condition(embeds)
    for h in hooks:
        h.remove()
    hidden = golden_model.config.hidden_size
    torch.testing.assert_close(cond[..., :hidden], llm.norm(outputs[-1]))
    torch.testing.assert_close(cond[..., hidden:], outputs[-2])


def test_visual_embedding_indicators_and_splice(golden_model):
    ids = torch.tensor([5, -301, -300, -302, 7])
    visual = [torch.randn(3, golden_model.config.hidden_size)]
    embeds = golden_model.merge_multimodal(ids, visual)[0]
    vte = golden_model.vte.weight
    assert embeds.shape[0] == 7
    torch.testing.assert_close(embeds[1], vte[-5])
    torch.testing.assert_close(embeds[2:5], visual[0])
    torch.testing.assert_close(embeds[5], vte[-4])
    torch.testing.assert_close(embeds[6], golden_model.llm.model.embed_tokens.weight[7])


# -- the real config -----------------------------------------------------------------------------

def test_inspect_real_config_matches_tensors_json():
    cfg = load_config(REAL_CONFIG / "config.json")
    result = inspect_config(cfg, tensors=True)
    expected = json.loads((REAL_CONFIG / "tensors.json").read_text())
    assert result["tensors"] == expected
    assert result["total_params"] == 3_644_208_367
    comps = {k: v["params"] for k, v in result["components"].items()}
    assert comps == {"llm": 1_720_574_976, "vision": 309_984_256, "visual_head": 268_550_136,
                     "vte": 134_217_728, "yak": 1_127_227_408, "vae": 83_653_863}


def test_real_config_renames_native_model_types():
    data = json.loads((REAL_CONFIG / "config.json").read_text())
    data["visual_tokenizer_config"]["model_type"] = "aimv2_native_visual_tokenizer"
    data["visual_tokenizer_config"]["backbone_config"]["model_type"] = "aimv2_native"
    from lite.model.config import parse_config

    cfg = parse_config(data)
    assert cfg.vision.hidden_size == 1024 and cfg.vision.vocab_size == 65536 and cfg.yak.context_in_dim == 4096
