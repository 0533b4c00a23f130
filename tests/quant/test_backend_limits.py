"""Backends own their limits: each says which weight shapes it holds in a format (`accepts`), and the one chain
(`quant.resolve` with a shape, `quantize_linear_from_weight`) gives a refused int4 layer int8, keeping the
backend choice. Expectations are written from the kernels' documented conditions, not read from the code."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import quant
from quant import QuantSpec, layer_kind, quantize_linear_from_weight
from quant.backends import REGISTRY
from quant.backends import quanto as quanto_backend

SHAPES = [(256, 256), (96, 256), (40, 256), (256, 128), (256, 384), (64, 200), (48, 96)]
needs_quanto = pytest.mark.skipif(importlib.util.find_spec("optimum.quanto") is None, reason="optimum-quanto missing")


def tinygemm_holds(out_features: int, in_features: int) -> bool:
    """quanto's TinyGemm on CPU: bf16, groups of exactly 128 (in > 128 and a multiple of 128), out % 16 == 0."""
    return in_features > 128 and in_features % 128 == 0 and out_features % 16 == 0


def native_holds(out_features: int, in_features: int, group: int = 128) -> bool:
    """torch's int4 kernel: a group of 32..256 dividing in (quanto's shrink-by-32 rule, or the whole row when
    in is itself such a size), out % 16 == 0."""
    g = group if in_features > group else None
    if g is not None:
        while in_features % g and g > 32:
            g -= 32
        g = g if in_features % g == 0 else None
    if g is None and in_features in (32, 64, 128, 256):
        g = in_features
    return g in (32, 64, 128, 256) and out_features % 16 == 0


def test_every_backend_answers_for_its_limits() -> None:
    for name, backend in REGISTRY.items():
        for fmt in backend.formats:
            why = backend.accepts((256, 256), fmt, "cpu", QuantSpec(fmt, name))
            assert why is None, (name, fmt, why)  # a plain shape every kernel holds


@needs_quanto
@pytest.mark.parametrize("shape", SHAPES)
def test_auto_int4_on_cpu_is_int4_only_where_tinygemm_runs(shape: tuple[int, int]) -> None:
    resolved = quant.resolve(QuantSpec("int4"), "cpu", shape)
    assert (resolved.backend, resolved.format) == ("quanto", "int4" if tinygemm_holds(*shape) else "int8")
    fp32 = quant.resolve(QuantSpec("int4", compute_dtype=torch.float32), "cpu", shape)
    assert fp32.format == "int8"  # TinyGemm runs bf16 only
    assert quant.resolve(QuantSpec("int4"), "meta", shape).format == "int4"  # planning: no device, no refusal


@pytest.mark.parametrize("shape", SHAPES)
def test_native_int4_keeps_its_backend_when_it_refuses(shape: tuple[int, int]) -> None:
    resolved = quant.resolve(QuantSpec("int4", "native"), "cpu", shape)
    assert (resolved.backend, resolved.format) == ("native", "int4" if native_holds(*shape) else "int8")
    layer = quantize_linear_from_weight(torch.randn(shape), None, QuantSpec("int4", "native"), "cpu")
    kind = layer_kind(layer)
    assert (kind.backend, kind.format) == (resolved.backend, resolved.format)


def test_auto_keeps_auto_after_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without quanto the auto chain lands int4 on the native kernel; a shape it refuses takes auto's int8,
    # which is again the native backend's (ranked before the pure-torch int8 fallback).
    monkeypatch.setattr(quanto_backend, "unavailable_reason", lambda device: "optimum-quanto is not installed (test)")
    assert quant.resolve(QuantSpec("int4"), "cpu", (256, 256)).backend == "native"
    refused = quant.resolve(QuantSpec("int4"), "cpu", (40, 200))
    assert (refused.backend, refused.format) == ("native", "int8")
