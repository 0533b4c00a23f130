"""Pure-torch int8 weight-only layers: the fallback that runs on any device, and 8-bit embeddings.

Per-output-row absmax scales in fp32 (q = round(w / s), s = max|w_row| / 127). The matmul
multiplies by the int8 values cast to the compute dtype (exact: |q| <= 127 fits every float
format) and applies the row scale to the output, so no scaled full-precision weight is stored.

A call of a few rows on CPU (a decoded token through the tied LM head) instead streams the int8
bytes through torch's weight-only kernel `_weight_int8pack_mm`: casting a 151936x2048 table per
token would read and write 0.9 GB, the kernel reads the 0.31 GB once (half of the bf16 head's bytes;
AMD EPYC Zen 5, 2 threads: 36 ms against 49 ms for the fastest bf16 GEMV, scripts/bench_llm_peer.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SCALE_DTYPE = torch.float32
#: Calls of at most this many rows on CPU take the packed int8 kernel (decode); more rows cast the weight
#: once per call and run a dense GEMM, where the packed kernel is ~4x slower (quant/backends/torch_native.py).
KERNEL_MAX_ROWS = 32
#: The CPU kernel is fast only with bf16 activations (its fp32 path is scalar).
KERNEL_DTYPE = torch.bfloat16


def _packed_kernel_ok(x: torch.Tensor, qweight: torch.Tensor, in_features: int) -> bool:
    """Whether `torch._weight_int8pack_mm` can take this call: CPU, few rows, a 16-byte aligned weight
    whose rows are a multiple of 16 bytes (torch 2.13's kernel crashes on an 8- but not 16-byte aligned
    weight, and segfaults on in_features 40, 72, 100 or 136 while 16, 48, 64, 80 and 2048 run)."""
    return (x.device.type == "cpu" and qweight.device.type == "cpu" and x.is_floating_point()
            and x.numel() <= KERNEL_MAX_ROWS * in_features and qweight.data_ptr() % 16 == 0
            and in_features % 16 == 0
            and qweight.is_contiguous() and hasattr(torch, "_weight_int8pack_mm"))


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (q int8 [rows, cols], scale fp32 [rows]); all-zero rows get scale 1."""
    w = weight.detach().to(torch.float32)
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(SCALE_DTYPE)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


def _check_rows(qweight: torch.Tensor, scale: torch.Tensor) -> None:
    """int8 rows with one scale each: the layout both int8 modules share."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"qweight must be a 2-D int8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    if scale.shape != (qweight.shape[0],):
        raise ValueError(f"scale must have shape ({qweight.shape[0]},), got {tuple(scale.shape)}")


class Int8Linear(nn.Module):
    """y = (x @ q^T) * scale + bias, q int8 per-row; output in the input's dtype."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        _check_rows(qweight, scale)
        self.out_features, self.in_features = qweight.shape
        self.compute_dtype = compute_dtype
        # Parameters (not buffers) so a tied head keeps sharing them through module.to(): nn.Module
        # moves a shared Parameter in place, but gives each module its own copy of a shared buffer.
        self.qweight = _frozen(qweight)
        self.scale = _frozen(scale)
        if bias is not None:
            self.bias: nn.Parameter | None = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        else:
            self.bias = None
        self.tied_to: str | None = None  # name of the Int8Embedding whose payload this layer shares

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device | str | None = None,
                    compute_dtype: torch.dtype = torch.bfloat16) -> "Int8Linear":
        """Quantize one full-precision weight on `device` (default: where it lives)."""
        target = torch.device(device) if device is not None else weight.device
        q, s = quantize_rows_int8(weight.to(target))
        return cls(q, s, None if bias is None else bias.to(target), compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        if _packed_kernel_ok(x, self.qweight, self.in_features):
            x2 = x.reshape(-1, self.in_features).to(KERNEL_DTYPE).contiguous()
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scale.to(KERNEL_DTYPE))
            y = y.to(cd).reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x.to(cd), self.qweight.to(cd)) * self.scale.to(cd)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype) if x.dtype.is_floating_point else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype}" + (f", tied_to={self.tied_to!r}" if self.tied_to else ""))


class Int8Embedding(nn.Module):
    """Token embedding stored as int8 rows with one fp32 scale per token (half of bf16)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, padding_idx: int | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        _check_rows(qweight, scale)
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.compute_dtype = compute_dtype
        # Parameters (not buffers) so a tied head keeps sharing them through module.to(): nn.Module
        # moves a shared Parameter in place, but gives each module its own copy of a shared buffer.
        self.qweight = _frozen(qweight)
        self.scale = _frozen(scale)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, device: torch.device | str | None = None, padding_idx: int | None = None,
                    compute_dtype: torch.dtype = torch.bfloat16) -> "Int8Embedding":
        """Quantize one [vocab, dim] table (e.g. read from a memory-mapped safetensors)."""
        target = torch.device(device) if device is not None else weight.device
        q, s = quantize_rows_int8(weight.to(target))
        return cls(q, s, padding_idx, compute_dtype)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, device: torch.device | str | None = None,
                       compute_dtype: torch.dtype | None = None) -> "Int8Embedding":
        cd = compute_dtype or (embedding.weight.dtype if embedding.weight.dtype.is_floating_point
                               and embedding.weight.dtype != torch.float32 else torch.bfloat16)
        return cls.from_weight(embedding.weight, device, embedding.padding_idx, cd)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        return F.embedding(ids, self.qweight).to(cd) * self.scale[ids].unsqueeze(-1).to(cd)

    def tied_linear(self, name: str | None = None) -> Int8Linear:
        """An Int8Linear head reading this table's int8 payload (same tensors, zero extra bytes)."""
        head = Int8Linear(self.qweight, self.scale, None, self.compute_dtype)
        head.tied_to = name
        return head

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, compute_dtype={self.compute_dtype}"


def quantize_tied_embedding(embedding: nn.Embedding, lm_head: nn.Linear | None = None,
                            device: torch.device | str | None = None, compute_dtype: torch.dtype | None = None,
                            embedding_name: str | None = None) -> tuple[Int8Embedding, Int8Linear]:
    """8-bit embedding plus a head sharing its storage, for models with tied word embeddings.

    If `lm_head` is given it must really be tied (same tensor, or equal shape and values)
    and bias-free, because the head will read the embedding's payload.
    """
    if lm_head is not None:
        if lm_head.bias is not None:
            raise ValueError("a tied LM head cannot have a bias: the shared int8 payload has none")
        w_head, w_emb = lm_head.weight, embedding.weight
        same = w_head is w_emb or (w_head.device.type != "meta" and w_emb.device.type != "meta"
                                   and w_head.shape == w_emb.shape and w_head.data_ptr() == w_emb.data_ptr())
        if not same and (w_head.shape != w_emb.shape or not torch.equal(w_head, w_emb)):
            raise ValueError("lm_head is not tied to the embedding (different weights); quantize it separately")
    emb = Int8Embedding.from_embedding(embedding, device, compute_dtype)
    return emb, emb.tied_linear(embedding_name)


class Int8VisualEmbedding(nn.Module):
    """A table used as a matmul's right operand (Ovis-U1's visual embedding), as int8 rows + fp32 row scales.

    Float input [..., n] (probabilities over the first n visual words): returns
    `x @ dequant(table[:n])` in `compute_dtype`, computed `block_rows` table rows at a time (the
    row scale is folded into x, accumulation in fp32), so no dequantized copy of the table is ever
    made. Integer input: a row lookup. Always through `forward`, so module hooks see every use.
    `.weight` returns the int8 payload (for code that only asks for its device).
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, compute_dtype: torch.dtype = torch.bfloat16,
                 block_rows: int = 8192) -> None:
        super().__init__()
        _check_rows(qweight, scale)
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.compute_dtype = compute_dtype
        self.block_rows = block_rows
        self.qweight = nn.Parameter(qweight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight

    @classmethod
    def from_weight(cls, weight: torch.Tensor, device: torch.device | str | None = None,
                    compute_dtype: torch.dtype = torch.bfloat16) -> "Int8VisualEmbedding":
        """Quantize a [V, D] table (per-row symmetric absmax int8, as `quantize_rows_int8`)."""
        target = torch.device(device) if device is not None else weight.device
        q, s = quantize_rows_int8(weight.to(target))
        return cls(q, s, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        if not x.is_floating_point():
            return F.embedding(x, self.qweight).to(cd) * self.scale[x].unsqueeze(-1).to(cd)
        n = x.shape[-1]
        flat = x.reshape(-1, n)
        out = torch.zeros(flat.shape[0], self.embedding_dim, dtype=torch.float32, device=x.device)
        for start in range(0, n, self.block_rows):
            stop = min(n, start + self.block_rows)
            xs = (flat[:, start:stop].float() * self.scale[start:stop]).to(cd)
            out += (xs @ self.qweight[start:stop].to(cd)).float()
        return out.to(cd).reshape(*x.shape[:-1], self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8, compute_dtype={self.compute_dtype}"
