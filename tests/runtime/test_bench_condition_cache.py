"""scripts/bench_condition_cache.py's API path compares the images' pixels: a cached second image equals an
uncached one bitwise, and an image that differs reads as different (the check once compared result objects and
read False whatever the pixels)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from lite.runtime.pipeline import OvisPipeline

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_condition_cache.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_condition_cache", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_api_path_reports_hits_and_bitwise_identity(bench, tiny_dir) -> None:
    out = bench.api_phases(str(tiny_dir), 32, 1, "cpu")
    assert out["bitwise_same_as_uncached"] and out["uncached_repeat_bitwise"]
    assert all(r < 1 for r in out["ratios"])


def test_the_pixels_it_compares_are_the_images(bench, tiny_dir, monkeypatch) -> None:
    real = OvisPipeline.generate
    calls = []

    def generate(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 4:  # the first uncached image: one pixel changed
            img = result.images[0]
            img.putpixel((0, 0), tuple((v + 1) % 256 for v in img.getpixel((0, 0))))
        return result

    monkeypatch.setattr(OvisPipeline, "generate", generate)
    out = bench.api_phases(str(tiny_dir), 32, 1, "cpu")
    assert not out["bitwise_same_as_uncached"] and not out["uncached_repeat_bitwise"]
