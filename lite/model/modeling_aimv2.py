"""AIMv2 native-resolution vision backbone and Ovis' softmax visual tokenizer (spec §3.2-§3.3).

Module names follow the checkpoint (`preprocessor.patchifier.proj`, `trunk.blocks.N.attn.qkv`, ...).
The reference needs flash-attn's varlen kernel; here every image attends to itself through SDPA,
one image at a time, which is the same block-diagonal attention on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lite.model.architecture import OVIS_U1
from lite.model.config import VisionConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back, then scaled (the reference's op order)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's rms_norm upcasts, normalises in fp32 and casts back: the reference's
        # x.float() * rsqrt(mean(x^2) + eps), then .to(x.dtype), in one call
        y = F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        return y.mul_(self.weight) if self.weight.dtype == y.dtype else y * self.weight


def group_order(grid: torch.Tensor, stride: int = 2) -> torch.Tensor:
    """Reorder a raster [gh, gw, ...] grid into 2x2-group-major token order (spec §3.1 step 5)."""
    gh, gw = grid.shape[:2]
    rest = grid.shape[2:]
    g = grid.reshape(gh // stride, stride, gw // stride, stride, *rest)
    g = g.permute(0, 2, 1, 3, *range(4, 4 + len(rest)))
    return g.reshape(gh * gw, *rest)


class PatchProjection(nn.Conv2d):
    """The checkpoint's patch conv (kernel = stride = patch), run as the GEMM it is on flattened patches.

    Each patch meets the kernel exactly once, so conv(x)[n, o] = sum over (c, i, j) of x[n, c, i, j] w[o, c, i, j]:
    one [N, C p p] @ [C p p, O] product. oneDNN's bf16 conv with a 14x14 kernel took 63 ms for 1024 patches
    on a 2-core Xeon AMX, about 20x this GEMM."""

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # [N, C * p * p] in (c, i, j) order
        return F.linear(patches.to(self.weight.dtype), self.weight.flatten(1), self.bias)


class Patchifier(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.num_channels = cfg.num_channels
        self.proj = PatchProjection(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=True)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.proj(pixel_values.reshape(-1, self.num_channels * self.patch_size ** 2))
        return self.norm(x)


class Preprocessor(nn.Module):
    """Patch embedding plus the learned absolute position table, resized per image."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.patchifier = Patchifier(cfg)
        self.grid = cfg.pos_grid
        self.hidden_stride = cfg.hidden_stride
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, cfg.hidden_size))

    def interpolated_pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        """[gh, gw, C] raster table: torch bicubic, align_corners=False, no antialias (spec §3.2 step 2)."""
        c = self.pos_embed.shape[-1]
        table = self.pos_embed.view(1, self.grid, self.grid, c).permute(0, 3, 1, 2)
        if (gh, gw) != (self.grid, self.grid):
            table = F.interpolate(table, size=(gh, gw), mode="bicubic", align_corners=False)
        return table[0].permute(1, 2, 0)

    def forward(self, pixel_values: torch.Tensor, grid_thws: torch.Tensor) -> torch.Tensor:
        x = self.patchifier(pixel_values)
        pos = [
            group_order(self.interpolated_pos_embed(int(h), int(w)), self.hidden_stride).repeat(int(t), 1)
            for t, h, w in grid_thws.tolist()
        ]
        return x + torch.cat(pos, 0).to(x.dtype)


def vision_rope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """inv_freq_j = 1 / theta^(2j / (d/2)) in fp32, as the reference computes it once."""
    dim = head_dim // 2
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def vision_rope_angles(grid_thws: torch.Tensor, head_dim: int, stride: int = 2) -> torch.Tensor:
    """[N, head_dim/2] angles (row freqs, then column freqs) for every patch, in group order."""
    inv_freq = vision_rope_inv_freq(head_dim)
    angles = []
    for t, h, w in grid_thws.tolist():
        rows = torch.arange(h).view(h, 1).expand(h, w)
        cols = torch.arange(w).view(1, w).expand(h, w)
        ids = group_order(torch.stack([rows, cols], -1), stride).repeat(int(t), 1).float()
        angles.append(torch.cat([ids[:, :1] * inv_freq, ids[:, 1:] * inv_freq], -1))
    return torch.cat(angles, 0)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotary_tables(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [N, D] (each of the D/2 angles twice), made once per forward and shared by every layer."""
    return angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half RoPE in fp32, x * cos + rotate_half(x) * sin; cos and sin broadcast against x.

    Written half by half, x1 cos - x2 sin and x2 cos + x1 sin, which rounds exactly as the reference's
    op order ((-a) b = -(a b) and u + (-v) = u - v in IEEE arithmetic) without building rotate_half(x):
    bitwise the same, about half the passes over memory. The result is contiguous whatever x's strides."""
    half = x.shape[-1] // 2
    xf = x.float().contiguous()  # a strided bf16 view comes out contiguous from float(); fp32 may not
    out = xf * cos
    out[..., :half].sub_(xf[..., half:] * sin[..., :half])
    out[..., half:].add_(xf[..., :half] * sin[..., half:])
    return out.to(x.dtype)


def apply_rotary_rotate_half(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """RoPE from the angles [N, D/2] for x [N, ..., D] (see `apply_rotary`)."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    cos, sin = rotary_tables(angles)
    return apply_rotary(x, cos.view(shape), sin.view(shape))


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], seqlens: list[int]) -> torch.Tensor:
        n, c = x.shape
        heads = self.qkv(x).view(n, 3, self.num_heads, c // self.num_heads).permute(1, 2, 0, 3)  # [3, H, N, D]
        # q and k rotated in the same passes, written out head-major: the flash kernel reads contiguous
        # [H, N, D] operands ~15% faster than strided ones (Xeon AMX, 1024 patches)
        q, k = apply_rotary(heads[:2], *rope).unbind(0)
        v = heads[2].contiguous()
        outs = []
        for qi, ki, vi in zip(q.split(seqlens, 1), k.split(seqlens, 1), v.split(seqlens, 1)):
            # One image at a time: images in a prompt never attend to each other. 4-D [1, H, N, D],
            # because PyTorch's CPU flash kernel refuses 3-D inputs and falls back to the math path.
            o = F.scaled_dot_product_attention(qi.unsqueeze(0), ki.unsqueeze(0), vi.unsqueeze(0))
            outs.append(o[0].transpose(0, 1).reshape(-1, c))
        return self.proj(outs[0] if len(outs) == 1 else torch.cat(outs, 0))


class SwiGLU(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.use_bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.use_bias)
        self.fc3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # silu(fc1 x) * fc3 x, in place on fc1's output: no further [N, 2816] buffers to allocate and fault in
        return self.fc2(F.silu(self.fc1(x), inplace=True).mul_(self.fc3(x)))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg)
        self.norm_1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)
        self.norm_2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], seqlens: list[int]) -> torch.Tensor:
        x = self.attn(self.norm_1(x), rope, seqlens).add_(x)  # x + attn(...), summed into attn's fresh output
        return self.mlp(self.norm_2(x)).add_(x)


class Trunk(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        # Loaded because the checkpoint has it; Ovis-U1 takes features before it (spec §3.2 step 6).
        self.post_trunk_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class AIMv2Model(nn.Module):
    """Native-resolution AIMv2: pixels [N, 588] in 2x2-group order -> features [N, C]."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.preprocessor = Preprocessor(cfg)
        self.trunk = Trunk(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_thws: torch.Tensor) -> torch.Tensor:
        x = self.preprocessor(pixel_values, grid_thws)
        angles = vision_rope_angles(grid_thws, self.config.head_dim, self.config.hidden_stride).to(x.device)
        rope = rotary_tables(angles)
        seqlens = [int(t * h * w) for t, h, w in grid_thws.tolist()]
        for block in self.trunk.blocks:
            x = block(x, rope, seqlens)
        return x


class VisualTokenizer(nn.Module):
    """Backbone + head: features -> a probability distribution over the visual vocabulary."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = AIMv2Model(cfg)
        self.head = nn.Sequential(
            nn.Linear(cfg.head_in_features, cfg.head_out_features, bias=False),
            nn.LayerNorm(cfg.head_out_features),
        )

    def merge_features(self, features: torch.Tensor) -> torch.Tensor:
        """[N, C] -> [N/4, 4C]: consecutive rows are one 2x2 group (spec §3.3 step 1)."""
        return features.reshape(-1, self.config.head_in_features)

    def probabilities(self, merged: torch.Tensor) -> torch.Tensor:
        """softmax(LN(Linear(x))) in fp32, cast back: [M, V-4] (the 4 indicator columns are zero)."""
        logits = self.head(merged)
        return logits.float().softmax(-1).to(logits.dtype)

    def embed(self, pixel_values: torch.Tensor, grid_thws: torch.Tensor, vte: "VisualEmbedding",
              chunk: int = 512) -> torch.Tensor:
        """Visual embeddings [N/4, H_llm] = probabilities @ vte, chunked to bound the [M, 65532] peak."""
        merged = self.merge_features(self.backbone(pixel_values, grid_thws))
        return torch.cat([vte(self.probabilities(part)) for part in merged.split(chunk)], 0)


class VisualEmbedding(nn.Embedding):
    """The VTE table. Float input: probabilities @ table (the reference's matmul, the 4 zero
    indicator columns skipped); integer input: a row lookup. Either way it goes through
    `forward`, so module hooks (offloading) see every use.

    `compute_dtype` None computes in the table's dtype (the reference's own matmul, bitwise). fp32 over
    a bf16/fp16 table (CPUs without native bf16, where this bf16 matmul runs at ~0.05 GFLOP/s) casts
    `block_rows` rows at a time and accumulates in fp32, so no fp32 copy of the whole table is made."""

    compute_dtype: torch.dtype | None = None
    block_rows: int = 4096

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            n = x.shape[-1]
            cd = self.compute_dtype
            if cd is None or cd == self.weight.dtype:
                return x.to(self.weight.dtype) @ self.weight[:n]
            flat = x.reshape(-1, n).to(cd)
            out = torch.zeros(flat.shape[0], self.embedding_dim, dtype=cd, device=x.device)
            for start in range(0, n, self.block_rows):
                stop = min(n, start + self.block_rows)
                out.addmm_(flat[:, start:stop], self.weight[start:stop].to(cd))
            return out.reshape(*x.shape[:-1], self.embedding_dim)
        return super().forward(x)




def indicator_rows(vocab_size: int) -> list[int]:
    """vte rows for ids -301..-304: V-5..V-2; row V-5 is also the last reachable visual word (spec §3.3)."""
    return [vocab_size - 5 + i for i in range(len(OVIS_U1.indicator_ids))]
