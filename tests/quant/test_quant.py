"""Tests for `quant`: formulas, bytes, include/exclude, streaming, export/restore, errors.

Tiny seeded shapes. int4 forwards only use TinyGemm-shaped layers (out % 16 == 0, in a
multiple of 128 and > 128, bf16) so quanto never JIT-compiles its C++ unpack extension.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import quant
from offload.accounting import module_nbytes
from quant import (Int8Embedding, Int8Linear, QuantBackendError, QuantFormatError, QuantSpec, embedding_layout_nbytes,
                   export_quantized, layout_nbytes, quantize, quantize_linear_from_weight,
                   quantize_tied_embedding, restore_quantized)
from quant.backends import bnb as bnb_backend
from quant.backends import quanto as quanto_backend

BF16 = torch.bfloat16
# (format, extra spec fields, relerr bound vs fp32 on Gaussian weights/inputs)
FORMATS = [
    ("nf4", {}, 0.15), ("fp4", {}, 0.18), ("int4", {}, 0.12), ("int8", {}, 0.012),
    ("fp8", {}, 0.05), ("bf16", {}, 0.01), ("fp16", {}, 0.002),
]
QUANT_SPECS = [
    QuantSpec("nf4"), QuantSpec("nf4", double_quant=True), QuantSpec("fp4"), QuantSpec("int4"),
    QuantSpec("int8"), QuantSpec("fp8"), QuantSpec("int8", backend="torch"),
]


def relerr(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Block(nn.Module):
    def __init__(self, d: int = 256, h: int = 512) -> None:
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.mlp = nn.ModuleDict({"up": nn.Linear(d, h, bias=False), "down": nn.Linear(h, d)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp["down"](torch.relu(self.mlp["up"](x)))


class TinyLM(nn.Module):
    """Embedding + blocks + tied head: the shape of the real LLM, in miniature."""

    def __init__(self, vocab: int = 96, d: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def tiny_lm(seed: int = 0, dtype: torch.dtype = BF16) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM().to(dtype)


# ---------------------------------------------------------------- spec


def test_spec_validation_lists_valid_values() -> None:
    with pytest.raises(ValueError, match="valid formats: nf4, fp4, int4, int8, fp8, bf16, fp16, none"):
        QuantSpec("int3")
    with pytest.raises(ValueError, match="valid backends: auto, bnb, quanto, native, torch"):
        QuantSpec("int8", backend="gguf")
    with pytest.raises(ValueError, match="implements: nf4, fp4"):
        QuantSpec("int8", backend="bnb")
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantSpec("int4", group_size=100)
    with pytest.raises(ValueError, match="compute_dtype"):
        QuantSpec("int8", compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="tuple of fnmatch"):
        QuantSpec("int8", include="blocks.*")  # a bare string would match character by character
    assert QuantSpec("int4").group_size == 128 and QuantSpec().compute_dtype == BF16


def test_effective_group_size_mirrors_quanto() -> None:
    assert quant.effective_group_size(256, 128) == 128
    assert quant.effective_group_size(128, 128) is None  # quanto only groups when in_features > group
    assert quant.effective_group_size(384, 256) == 192
    assert quant.effective_group_size(200, 128) is None
    assert quant.effective_group_size(160, 128) == 32


# ---------------------------------------------------------------- numerics


def test_int8_linear_matches_per_row_formula() -> None:
    g = gen(1)
    w, b = torch.randn(40, 72, generator=g), torch.randn(40, generator=g)
    w[3] = 0.0  # an all-zero row must not divide by zero
    layer = Int8Linear.from_weight(w, b, compute_dtype=torch.float32)
    absmax = w.abs().max(dim=1).values
    scale = torch.where(absmax > 0, absmax / 127, torch.ones(()))
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127)
    assert torch.equal(layer.qweight, q.to(torch.int8))
    assert torch.equal(layer.scale, scale)
    x = torch.randn(5, 72, generator=g)
    expected = x @ (q * scale[:, None]).T + b
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)
    assert relerr(layer(x), x @ w.T + b) < 0.01


@pytest.mark.parametrize("fmt,extra,bound", FORMATS, ids=[f[0] for f in FORMATS])
def test_quantized_matmul_relerr_vs_fp32(fmt: str, extra: dict, bound: float) -> None:
    g = gen(2)
    w, b = torch.randn(128, 256, generator=g) * 0.05, torch.randn(128, generator=g) * 0.05
    x = torch.randn(6, 256, generator=g)
    ref = x @ w.T + b
    layer = quantize_linear_from_weight(w, b, QuantSpec(fmt, **extra))
    cd = torch.float16 if fmt == "fp16" else BF16
    y = layer(x.to(cd))
    err = relerr(y, ref)
    assert err < bound, f"{fmt}: relerr {err:.4f} >= {bound}"
    if fmt not in ("bf16", "fp16"):
        assert err > 1e-4, "a quantized layer that matches fp32 exactly did not quantize"


def test_int8_embedding_formula_and_relerr() -> None:
    g = gen(3)
    w = torch.randn(50, 24, generator=g)
    emb = Int8Embedding.from_weight(w, compute_dtype=torch.float32)
    ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
    scale = w.abs().max(dim=1).values / 127
    q = torch.round(w / scale[:, None])
    torch.testing.assert_close(emb(ids), (q * scale[:, None])[ids])
    assert relerr(emb(ids), w[ids]) < 0.01


# ---------------------------------------------------------------- bytes


@pytest.mark.parametrize("spec", QUANT_SPECS + [QuantSpec("bf16"), QuantSpec("fp16")],
                         ids=lambda s: f"{s.format}-{s.backend}{'-dq' if s.double_quant else ''}")
@pytest.mark.parametrize("shape", [(256, 256, True), (96, 200, True), (200, 384, False), (7, 9, True), (64, 128, False),
                                   (32, 160, True)])
@pytest.mark.parametrize("cd", [BF16, torch.float32], ids=["bf16", "fp32"])
def test_layout_nbytes_equals_module_nbytes(spec: QuantSpec, shape: tuple[int, int, bool], cd: torch.dtype) -> None:
    n, k, has_bias = shape
    g = gen(n * k)
    w = torch.randn(n, k, generator=g)
    layer = quantize_linear_from_weight(w, torch.randn(n, generator=g) if has_bias else None, spec, compute_dtype=cd)
    lay = layout_nbytes(n, k, has_bias, spec, cd)
    assert module_nbytes(layer) == lay["total"]
    assert lay["total"] == lay["packed"] + lay["scales"] + lay["zeros"] + lay["bias"] + lay["other"]


def test_layout_formulas_independent() -> None:
    """Spot-check the layouts against hand arithmetic (4096x4096, bf16 compute, no bias)."""
    n = k = 4096
    assert layout_nbytes(n, k, False, QuantSpec("int8"))["total"] == n * k + n * 2 + 4  # quanto: bf16 row scale + 2 act scales
    assert layout_nbytes(n, k, False, QuantSpec("int8", backend="torch"))["total"] == n * k + n * 4
    assert layout_nbytes(n, k, False, QuantSpec("int4"))["total"] == n * k // 2 + 2 * (k // 128) * n * 2 + 4
    assert layout_nbytes(n, k, False, QuantSpec("nf4"))["total"] == n * k // 2 + (n * k // 64) * 4 + 64
    blocks = n * k // 64
    assert layout_nbytes(n, k, False, QuantSpec("nf4", double_quant=True))["total"] == (
        n * k // 2 + blocks + math.ceil(blocks / 256) * 4 + 4 + 64 + 1024)
    assert layout_nbytes(n, k, True, QuantSpec("bf16"))["total"] == (n * k + n) * 2
    assert layout_nbytes(n, k, False, QuantSpec("none"), torch.float32)["total"] == n * k * 4
    assert embedding_layout_nbytes(151936, 2048) == {"packed": 151936 * 2048, "scales": 151936 * 4, "zeros": 0,
                                                     "bias": 0, "other": 0, "total": 151936 * 2052}


def test_layout_on_meta_model_without_weights() -> None:
    with torch.device("meta"):
        model = Block()
    spec = QuantSpec("int4")
    total = sum(layout_nbytes(m.out_features, m.in_features, m.bias is not None, spec)["total"]
                for m in model.modules() if isinstance(m, nn.Linear))
    real = Block().to(BF16)
    quantize(real, spec)
    assert module_nbytes(real) == total


# ---------------------------------------------------------------- quantize()


def test_include_exclude_and_report() -> None:
    model = nn.ModuleDict({"blocks": nn.ModuleList([Block(), Block()]), "out": nn.Linear(256, 32)}).to(BF16)
    before = {n: module_nbytes(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    spec = QuantSpec("int8", include=("blocks.*",), exclude=("*.down",))
    report = quantize(model, spec)
    names = [r.name for r in report.layers]
    assert names == ["blocks.0.attn", "blocks.0.mlp.up", "blocks.1.attn", "blocks.1.mlp.up"]
    assert type(model["out"]) is nn.Linear and type(model["blocks"][0].mlp["down"]) is nn.Linear
    assert all(quanto_backend.owns(model.get_submodule(n)) for n in names)
    for r in report.layers:
        assert (r.format, r.backend) == ("int8", "quanto")
        assert r.bytes_before == before[r.name]
        assert r.bytes_after == layout_nbytes(*r.shape, model.get_submodule(r.name).bias is not None, spec)["total"]
    assert report.bytes_after < report.bytes_before and not report.fallbacks
    assert "blocks.0.attn" in str(report)
    # quantizing again leaves quantized layers alone
    assert [r.name for r in quantize(model, QuantSpec("int8", include=("blocks.*",))).layers] == [
        "blocks.0.mlp.down", "blocks.1.mlp.down"]


def test_root_linear_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="quantize_linear_from_weight"):
        quantize(nn.Linear(8, 8), QuantSpec("int8"))


def test_cast_and_none_formats() -> None:
    model = Block()
    report = quantize(model, QuantSpec("bf16"))
    assert all(m.weight.dtype == BF16 for m in model.modules() if isinstance(m, nn.Linear))
    assert [(r.format, r.backend) for r in report.layers] == [("bf16", "torch")] * 3
    assert quantize(Block(), QuantSpec("none")).layers == []


def test_auto_falls_back_and_explicit_backend_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bnb_backend, "unavailable_reason", lambda device: "bitsandbytes is not importable (test)")
    model = Block().to(BF16)
    report = quantize(model, QuantSpec("nf4"))
    assert {(r.requested, r.format, r.backend) for r in report.layers} == {("nf4", "int4", "quanto")}
    assert len(report.fallbacks) == 3
    with pytest.raises(QuantBackendError, match="bitsandbytes is not importable"):
        quantize_linear_from_weight(torch.randn(16, 16), None, QuantSpec("nf4", backend="bnb"))
    monkeypatch.setattr(quanto_backend, "unavailable_reason", lambda device: "optimum-quanto is not importable (test)")
    layer = quantize_linear_from_weight(torch.randn(16, 32), None, QuantSpec("fp8"))
    assert isinstance(layer, Int8Linear)


def test_meta_weight_cannot_be_quantized() -> None:
    with pytest.raises(ValueError, match="meta"):
        quantize_linear_from_weight(torch.empty(8, 8, device="meta"), None, QuantSpec("int8"))


# ---------------------------------------------------------------- tied embedding


def test_tied_embedding_shares_payload_and_costs_nothing() -> None:
    model = tiny_lm()
    emb, head = quantize_tied_embedding(model.embed, model.head, embedding_name="embed")
    assert head.qweight is emb.qweight and head.scale is emb.scale
    pair = nn.ModuleDict({"embed": emb, "head": head})
    assert module_nbytes(pair) == module_nbytes(emb) == embedding_layout_nbytes(96, 256)["total"]
    x = torch.randn(4, 256, dtype=BF16, generator=gen(4))
    exact = (x.float() @ emb.qweight.float().T) * emb.scale  # the int8 formula in fp32
    assert relerr(head(x), exact) < 0.005
    assert relerr(head(x), x.float() @ model.embed.weight.float().T) < 0.02
    pair.to(torch.float64)  # nn.Module moves shared Parameters in place: still one payload
    assert head.scale is emb.scale and head.scale.dtype == torch.float64
    untied = nn.Linear(256, 96, bias=False).to(BF16)
    with pytest.raises(ValueError, match="not tied"):
        quantize_tied_embedding(model.embed, untied)


# ---------------------------------------------------------------- streaming


def test_streaming_from_mmapped_safetensors(tmp_path: "os.PathLike[str]") -> None:
    g = gen(5)
    weights = {f"l{i}.weight": torch.randn(128, 256, generator=g).to(BF16) for i in range(3)}
    weights["l0.bias"] = torch.randn(128, generator=g).to(BF16)
    path = os.path.join(tmp_path, "w.safetensors")
    save_file(weights, path)
    spec = QuantSpec("int4")
    built = {}
    with safe_open(path, framework="pt") as f:
        for i in range(3):
            bias = f.get_tensor(f"l{i}.bias") if f"l{i}.bias" in f.keys() else None
            built[i] = quantize_linear_from_weight(f.get_tensor(f"l{i}.weight"), bias, spec)
    x = torch.randn(2, 256, dtype=BF16, generator=g)
    for i, layer in built.items():
        assert module_nbytes(layer) == layout_nbytes(128, 256, i == 0, spec)["total"]  # no fp weight kept
        dense = nn.Sequential(nn.Linear(256, 128, bias=i == 0)).to(BF16)
        dense[0].weight.data.copy_(weights[f"l{i}.weight"])
        if i == 0:
            dense[0].bias.data.copy_(weights["l0.bias"])
        quantize(dense, spec)
        assert torch.equal(layer(x), dense(x))


# ---------------------------------------------------------------- export / restore


def quantized_lm(spec: QuantSpec) -> TinyLM:
    model = tiny_lm()
    quantize(model, spec if spec.format != "int8" or spec.backend != "auto" else spec, device="cpu")
    emb, head = quantize_tied_embedding(model.embed, None, embedding_name="embed")
    model.embed, model.head = emb, head
    return model


@pytest.mark.parametrize("spec", QUANT_SPECS, ids=lambda s: f"{s.format}-{s.backend}{'-dq' if s.double_quant else ''}")
def test_export_restore_is_bitwise_identical(spec: QuantSpec, tmp_path: "os.PathLike[str]") -> None:
    model = quantized_lm(QuantSpec(spec.format, spec.backend, exclude=("head",), double_quant=spec.double_quant))
    ids = torch.tensor([[1, 5, 9, 95]])
    y = model(ids)
    path = os.path.join(tmp_path, "q.safetensors")
    tensors, entries = export_quantized(model)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)  # through a real file: mmapped on reload
    assert entries["head"]["tied_to"] == "embed" and "head.qweight" not in export_quantized(model)[0]
    with torch.device("meta"):
        skeleton = tiny_lm()
    assert skeleton.blocks[0].attn.weight.is_meta
    restored = restore_quantized(skeleton, load_file(path), entries)
    assert sorted(restored) == sorted(entries)
    assert not any(t.is_meta for t in skeleton.parameters())
    assert torch.equal(skeleton(ids), y)
    assert module_nbytes(skeleton) == module_nbytes(model)
    assert skeleton.head.qweight is skeleton.embed.qweight


def test_export_restore_in_memory_keeps_quanto_int4_kernel() -> None:
    model = quantized_lm(QuantSpec("int4"))
    tensors, entries = export_quantized(model)
    with torch.device("meta"):
        skeleton = tiny_lm()
    restore_quantized(skeleton, tensors, entries)
    assert type(skeleton.blocks[0].mlp["up"].weight).__name__ == "TinyGemmWeightQBitsTensor"
    assert entries["blocks.0.mlp.up"]["group_size"] == 128
    ids = torch.tensor([[2, 3]])
    assert torch.equal(skeleton(ids), model(ids))


def _corrupt(entries: dict, tensors: dict, how: str) -> tuple[dict, dict]:
    entries = json.loads(json.dumps(entries))
    tensors = dict(tensors)
    name = "blocks.0.attn"
    if how == "unknown format":
        entries[name]["format"] = "int3"
    elif how == "missing tensor":
        del tensors[f"{name}.scale"]
    elif how == "tensor shape":
        tensors[f"{name}.scale"] = tensors[f"{name}.scale"][:-1]
    elif how == "manifest shape":
        entries[name]["shape"] = [256, 128]
    elif how == "missing module":
        entries["blocks.7.attn"] = entries.pop(name)
    elif how == "bad shape field":
        entries[name]["shape"] = "256x256"
    elif how == "bad tie":
        entries["head"]["tied_to"] = "blocks.0.attn"
    elif how == "missing field":
        del entries[name]["dtype"]
    return entries, tensors


@pytest.mark.parametrize("how", ["unknown format", "missing tensor", "tensor shape", "manifest shape", "missing module",
                                 "bad shape field", "bad tie", "missing field"])
def test_corrupt_manifest_gives_one_line_error_naming_module(how: str) -> None:
    tensors, entries = export_quantized(quantized_lm(QuantSpec("int8")))
    bad_entries, bad_tensors = _corrupt(entries, tensors, how)
    with torch.device("meta"):
        skeleton = tiny_lm()
    with pytest.raises(QuantFormatError) as info:
        restore_quantized(skeleton, bad_tensors, bad_entries)
    msg = str(info.value)
    assert "\n" not in msg
    expected_name = {"missing module": "blocks.7.attn", "bad tie": "head"}.get(how, "blocks.0.attn")
    assert repr(expected_name) in msg
    assert skeleton.blocks[0].attn.weight.is_meta  # validated before anything was replaced


def test_portability_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    nf4 = quantized_lm(QuantSpec("nf4"))
    tensors, entries = export_quantized(nf4)
    int4_tensors, int4_entries = export_quantized(quantized_lm(QuantSpec("int4")))
    monkeypatch.setattr(bnb_backend, "unavailable_reason", lambda device: "bitsandbytes 4-bit does not run on mps")
    with torch.device("meta"):
        skeleton = tiny_lm()
    with pytest.raises(QuantFormatError, match=r"bnb nf4 payload cannot load .* re-export with format int4"):
        restore_quantized(skeleton, tensors, entries)
    # a quanto int8 payload still loads where quanto is missing: same int8 rows and scales
    int8 = quantized_lm(QuantSpec("int8"))
    tensors, entries = export_quantized(int8)
    monkeypatch.setattr(quanto_backend, "unavailable_reason", lambda device: "optimum-quanto is not importable")
    with torch.device("meta"):
        skeleton = tiny_lm()
    restore_quantized(skeleton, tensors, entries)
    assert isinstance(skeleton.blocks[0].attn, Int8Linear)
    ids = torch.tensor([[4, 8, 15]])
    assert relerr(skeleton(ids), int8(ids)) < 0.01
    with torch.device("meta"):
        skeleton = tiny_lm()
    with pytest.raises(QuantFormatError, match="quanto int4 payload cannot load"):
        restore_quantized(skeleton, int4_tensors, int4_entries)


def test_bnb_layers_have_cpu_repack_disabled() -> None:
    layer = quantize_linear_from_weight(torch.randn(64, 128), None, QuantSpec("nf4"))
    layer(torch.randn(2, 128, dtype=BF16))
    assert layer.support_avx512bf16_for_cpu is False
    assert tuple(layer.weight.shape) == (64 * 128 // 2, 1)  # not repacked in place by the forward


def test_quant_imports_no_lite_and_no_eager_backends() -> None:
    """Static check of every quant module: never `lite`; bnb/quanto only inside functions (lazy)."""
    import ast

    pkg = os.path.dirname(quant.__file__)
    for fname in sorted(os.listdir(pkg)):
        if not fname.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(pkg, fname)).read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m == "lite" or m.startswith("lite.") for m in mods), f"{fname} imports lite"
        for node in tree.body:  # module level only
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.startswith(("bitsandbytes", "optimum")) for m in mods), f"{fname} imports eagerly"
