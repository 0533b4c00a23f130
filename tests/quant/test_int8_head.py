"""The int8 tied head of the `cpu` preset: a decode-sized call streams the int8 payload through torch's packed
kernel and computes the same product as the dequantized weight; the cpu preset builds it tied to the embedding."""

from __future__ import annotations

import pytest
import torch

from quant.int8 import KERNEL_MAX_ROWS, Int8Linear, quantize_rows_int8


def _kernels(fn) -> set[str]:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.fixture
def head() -> Int8Linear:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(384, 96, generator=gen) * 0.05
    q, s = quantize_rows_int8(weight)
    return Int8Linear(q, s, None, torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 4])
def test_few_rows_run_the_packed_kernel_and_match_the_dequantized_product(head: Int8Linear, rows: int) -> None:
    x = torch.randn(1, rows, 96, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    assert "aten::_weight_int8pack_mm" in _kernels(lambda: head(x))
    # independent: float64 product of the bf16 input with q * scale
    want = x.double() @ (head.qweight.double() * head.scale.double()[:, None]).T
    got = head(x)
    assert got.shape == (1, rows, 384) and got.dtype == torch.bfloat16
    # bf16 rounding of the row scale and of the output: relative 2^-8 of the row's magnitude
    tol = 2 ** -7 * want.abs().amax() + 1e-3
    assert (got.double() - want).abs().max() <= tol


def test_many_rows_keep_the_dense_path_and_agree_with_the_kernel(head: Int8Linear) -> None:
    x = torch.randn(KERNEL_MAX_ROWS + 8, 96, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    kernels = _kernels(lambda: head(x))
    assert "aten::_weight_int8pack_mm" not in kernels
    dense = head(x)
    one_by_one = torch.cat([head(x[i:i + 1]) for i in range(x.shape[0])])
    assert torch.allclose(dense.float(), one_by_one.float(), rtol=2 ** -6, atol=1e-3)


def test_fp32_compute_casts_to_the_kernel_and_returns_fp32(head: Int8Linear) -> None:
    head.compute_dtype = torch.float32
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(1))
    y = head(x)
    assert y.dtype == torch.float32
    want = x.double() @ (head.qweight.double() * head.scale.double()[:, None]).T
    assert (y.double() - want).abs().max() <= 2 ** -7 * want.abs().amax() + 1e-3


def test_cpu_preset_ties_an_int8_head_to_an_int8_embedding(tiny_dir) -> None:
    from lite import OvisPipeline
    from quant import Int8Embedding

    pipe = OvisPipeline.from_pretrained(tiny_dir, device="cpu", preset="cpu", progress=False)
    emb, head = pipe.model.llm.model.embed_tokens, pipe.model.llm.lm_head
    assert isinstance(emb, Int8Embedding) and isinstance(head, Int8Linear)
    assert head.qweight is emb.qweight and head.scale is emb.scale  # zero extra bytes
    hidden = torch.randn(1, 1, emb.embedding_dim, generator=torch.Generator().manual_seed(2)).to(head.compute_dtype)
    assert "aten::_weight_int8pack_mm" in _kernels(lambda: head(hidden))


@pytest.mark.parametrize("in_features", [16, 40, 72, 100, 136, 2048])
def test_int8_linear_any_width_matches_the_dequantized_formula(in_features: int) -> None:
    """torch 2.13's packed int8 kernel segfaults on some widths (40, 72, 100, 136): those take the portable path."""
    g = torch.Generator().manual_seed(in_features)
    w = torch.randn(48, in_features, generator=g)
    layer = Int8Linear.from_weight(w, None, compute_dtype=torch.float32)
    x = torch.randn(3, in_features, generator=g)
    expected = x @ (layer.qweight.float() * layer.scale.float()[:, None]).T
    got = layer(x)
    assert got.shape == expected.shape  # the kernel path rounds x to bf16: a relative bound
    assert ((got - expected).norm() / expected.norm()).item() < 1e-2
