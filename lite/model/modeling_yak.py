"""Yak: Ovis-U1's MMDiT image generator (spec §3.6-§3.7), written to read like the equations.

    refiner:  c = MLP(mean(txt));  x = [cls ; W txt];  x += g_msa*Attn(LN x);  x += g_mlp*MLP(LN x)
    double:   img, txt -> joint attention over [txt ; img]  +  image-only attention  +  MLPs, all AdaLN
    single:   x = [txt ; img];  x += gate * W2 [Attn(xm) ; gelu(W1 xm)],  xm = (1+scale) LN x + shift
    final:    v = W ((1+scale) LN img + shift)

Compared with the reference, the token refiner is split out (`refine`) so that the pipeline can
run it once per condition instead of at every step, and the RoPE table is built in float64 on the
CPU (MPS has no float64) and only then moved to the execution device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lite.model.config import YakConfig

LN_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Embeddings: timestep (cos first) and FLUX-style 3-axis RoPE with interleaved pairs.
# ---------------------------------------------------------------------------------------------

def timestep_frequencies(dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """f_k = exp(float32(-ln max_period) * k / half), evaluated in float32 like the reference."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)


def timestep_embedding(t: torch.Tensor, dim: int = 256, time_factor: float = 1000.0) -> torch.Tensor:
    """[cos(t' f), sin(t' f)] with t' = 1000 t computed in t's dtype (bf16 rounds it, spec §3.7)."""
    t = time_factor * t
    args = t[:, None].float() * timestep_frequencies(dim).to(t.device)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb.to(t.dtype) if torch.is_floating_point(t) else emb


def rope_table(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float) -> torch.Tensor:
    """[B, 1, L, D/2, 2, 2] rotation matrices [[cos, -sin], [sin, cos]], angles in float64 on CPU."""
    pos = ids.detach().to("cpu", torch.float64)
    tables = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angle = pos[..., axis, None] * omega
        cos, sin = torch.cos(angle), torch.sin(angle)
        tables.append(torch.stack([cos, -sin, sin, cos], dim=-1).view(*angle.shape, 2, 2))
    return torch.cat(tables, dim=-3).unsqueeze(1).float().to(ids.device)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x [B, H, L, D] in fp32 and cast back."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = table[..., 0] * pairs[..., 0] + table[..., 1] * pairs[..., 1]
    return out.reshape(*x.shape).type_as(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """QK-normed q, k -> RoPE -> SDPA -> heads merged head-major: [B, L, H*D]."""
    q, k = apply_rope(q, table), apply_rope(k, table)
    out = F.scaled_dot_product_attention(q, k, v)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """"B L (K H D) -> K B H L D" with K=3 outermost."""
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """The parameter-free LayerNorm every Yak block uses (eps 1e-6)."""
    return F.layer_norm(x, (x.shape[-1],), eps=LN_EPS)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (1 + scale) * x + shift


# ---------------------------------------------------------------------------------------------
# Small modules named as in the checkpoint.
# ---------------------------------------------------------------------------------------------

class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """QK-norm: RMS over the head dim in fp32, cast back, times a learned `scale`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """qkv + QK-norm + output projection; the attention itself is `attention()`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class Modulation(nn.Module):
    """Linear(silu(vec)) split into `n` [B, 1, dim] vectors."""

    def __init__(self, dim: int, n: int) -> None:
        super().__init__()
        self.n = n
        self.lin = nn.Linear(dim, n * dim)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.n, dim=-1)


def gelu_mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


# ---------------------------------------------------------------------------------------------
# Token refiner (spec §3.6).
# ---------------------------------------------------------------------------------------------

class RefinerMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class RefinerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.self_attn_qkv = nn.Linear(dim, 3 * dim)
        self.self_attn_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = RefinerMLP(dim, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        g_msa, g_mlp = self.adaLN_modulation(c).chunk(2, dim=1)
        q, k, v = split_qkv(self.self_attn_qkv(self.norm1(x)), self.num_heads)
        a = F.scaled_dot_product_attention(q, k, v)
        b, h, n, d = a.shape
        x = x + self.self_attn_proj(a.transpose(1, 2).reshape(b, n, h * d)) * g_msa.unsqueeze(1)
        return x + self.mlp(self.norm2(x)) * g_mlp.unsqueeze(1)


class TokenRefinerStack(nn.Module):
    def __init__(self, depth: int, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(RefinerBlock(dim, num_heads, mlp_hidden) for _ in range(depth))


class TextProjection(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class SingleTokenRefiner(nn.Module):
    """txt [B, L, 4096] -> (txt_fea [B, L, D], y [B, D]); depends on the condition only."""

    def __init__(self, cfg: YakConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.input_embedder = nn.Linear(cfg.context_in_dim, d)
        self.c_embedder = TextProjection(cfg.context_in_dim, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        # The refiner's MLP is 4x wide whatever `mlp_ratio` says, as in the reference (spec §3.6).
        self.individual_token_refiner = TokenRefinerStack(cfg.refiner_depth, d, cfg.refiner_heads,
                                                          cfg.refiner_mlp_hidden)

    def forward(self, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.c_embedder(txt.mean(dim=1))
        x = self.input_embedder(txt)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        for block in self.individual_token_refiner.blocks:
            x = block(x, c)
        return x[:, 1:], x[:, 0]


# ---------------------------------------------------------------------------------------------
# MMDiT blocks (spec §3.7 steps 6-9).
# ---------------------------------------------------------------------------------------------

class DoubleStreamXBlock(nn.Module):
    def __init__(self, cfg: YakConfig) -> None:
        super().__init__()
        d, h = cfg.hidden_size, cfg.num_heads
        self.img_mod = Modulation(d, 9)  # TriModulation
        self.img_attn = SelfAttention(d, h, cfg.qkv_bias)
        self.img_self_attn = SelfAttention(d, h, cfg.qkv_bias)
        self.img_mlp = gelu_mlp(d, cfg.mlp_hidden)
        self.txt_mod = Modulation(d, 6)
        self.txt_attn = SelfAttention(d, h, cfg.qkv_bias)
        self.txt_mlp = gelu_mlp(d, cfg.mlp_hidden)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift1, scale1, gate1, shift2, scale2, gate2, shift3, scale3, gate3 = self.img_mod(vec)
        tshift1, tscale1, tgate1, tshift2, tscale2, tgate2 = self.txt_mod(vec)
        n_txt = txt.shape[1]

        img_norm = layer_norm(img)
        img_q, img_k, img_v = self.img_attn.project_qkv(modulate(img_norm, shift1, scale1))
        own_q, own_k, own_v = self.img_self_attn.project_qkv(modulate(img_norm, shift3, scale3))
        txt_q, txt_k, txt_v = self.txt_attn.project_qkv(modulate(layer_norm(txt), tshift1, tscale1))

        joint = attention(torch.cat([txt_q, img_q], 2), torch.cat([txt_k, img_k], 2),
                          torch.cat([txt_v, img_v], 2), table)
        txt_out, img_out = joint[:, :n_txt], joint[:, n_txt:]
        own_out = attention(own_q, own_k, own_v, table[:, :, n_txt:])

        img = img + gate1 * self.img_attn.proj(img_out)
        img = img + gate3 * self.img_self_attn.proj(own_out)
        img = img + gate2 * self.img_mlp(modulate(layer_norm(img), shift2, scale2))
        txt = txt + tgate1 * self.txt_attn.proj(txt_out)
        txt = txt + tgate2 * self.txt_mlp(modulate(layer_norm(txt), tshift2, tscale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, cfg: YakConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.hidden_size, self.num_heads, self.mlp_hidden = d, cfg.num_heads, cfg.mlp_hidden
        self.linear1 = nn.Linear(d, 3 * d + cfg.mlp_hidden)
        self.linear2 = nn.Linear(d + cfg.mlp_hidden, d)
        self.norm = QKNorm(cfg.head_dim)
        self.modulation = Modulation(d, 3)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(layer_norm(x), shift, scale)).split(
            [3 * self.hidden_size, self.mlp_hidden], dim=-1)
        q, k, v = split_qkv(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat([attention(q, k, v, table), F.gelu(mlp, approximate="tanh")], 2))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, cfg: YakConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.linear = nn.Linear(d, cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear(modulate(layer_norm(x), shift[:, None, :], scale[:, None, :]))


@dataclass
class RefinedText:
    """A condition after the token refiner: reused unchanged at every denoising step."""

    txt_fea: torch.Tensor  # [B, L, D]
    y: torch.Tensor  # [B, D], the CLS output


class YakTransformer(nn.Module):
    """Velocity v = f(img, t | refined text, optional condition image) (spec §3.7)."""

    def __init__(self, cfg: YakConfig) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, d)
        self.time_in = MLPEmbedder(cfg.time_embed_dim, d)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, d)
        self.guidance_in = nn.Identity()
        self.txt_in = SingleTokenRefiner(cfg)
        self.double_blocks = nn.ModuleList(DoubleStreamXBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(cfg)

    def refine(self, txt: torch.Tensor) -> RefinedText:
        txt_fea, y = self.txt_in(txt.to(self.txt_in.input_embedder.weight.dtype))
        return RefinedText(txt_fea, y)

    def rope(self, txt_len: int, img_ids: torch.Tensor) -> torch.Tensor:
        txt_ids = torch.zeros(img_ids.shape[0], txt_len, 3, dtype=img_ids.dtype, device=img_ids.device)
        return rope_table(torch.cat([txt_ids, img_ids], 1), self.config.axes_dim, self.config.theta)

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, text: RefinedText, t: torch.Tensor,
                cond_img: torch.Tensor | None = None, cond_img_ids: torch.Tensor | None = None,
                table: torch.Tensor | None = None) -> torch.Tensor:
        """img [B, N, 16], t [B] in img's dtype -> velocity [B, N, 16].

        `table` may be passed in to reuse the RoPE table across steps (it depends on shapes only).
        """
        n_target = img.shape[1]
        if cond_img is not None:
            img = torch.cat([img, cond_img.to(img.dtype)], 1)
            img_ids = torch.cat([img_ids, cond_img_ids], 1)
        if table is None:
            table = self.rope(text.txt_fea.shape[1], img_ids)
        x = self.img_in(img.to(self.img_in.weight.dtype))
        vec = self.time_in(timestep_embedding(t, self.config.time_embed_dim).to(x.dtype))
        vec = vec + self.vector_in(text.y)
        txt = text.txt_fea
        for block in self.double_blocks:
            x, txt = block(x, txt, vec, table)
        x = torch.cat([txt, x], 1)
        for block in self.single_blocks:
            x = block(x, vec, table)
        out = self.final_layer(x[:, txt.shape[1]:], vec)
        return out[:, :n_target]
