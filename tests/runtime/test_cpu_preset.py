"""The `cpu` preset computes in the dtype this CPU's instruction set makes fast, and keeps the planned memory."""

from __future__ import annotations

from dataclasses import replace

import torch

from lite.runtime.cpu.plan import PROCESS, Choice
from lite.runtime.cpu.probes import this_machine_plan
from lite.runtime.pipeline import OvisPipeline


def _force_compute(monkeypatch, compute: str, reason: str) -> None:
    """This machine's CPU plan with another compute choice (what a CPU of the other kind would decide)."""
    monkeypatch.setattr(PROCESS, "plan", replace(this_machine_plan(), compute=Choice(compute, reason)))


def test_the_cpu_preset_computes_in_the_dtype_this_cpu_makes_fast(tiny_dir):
    """ISA-dependent by design: the expected dtype is read from this machine's instruction set (bf16 only where
    bf16 GEMMs are native: AMX, AVX512-BF16, ARM bf16), so the assertion holds on every CPU."""
    plan = this_machine_plan()
    expected, reason = plan.compute_dtype, plan.compute.reason
    pipe = OvisPipeline.from_pretrained(tiny_dir, device="cpu", preset="cpu", progress=False)
    assert pipe.dtype == expected
    assert pipe.compute_reason == reason and ("fp32" in reason) == (expected == torch.float32)


def test_without_native_bf16_weights_stay_bf16_and_compute_is_fp32(tiny_dir, monkeypatch):
    """The AVX2-only path, forced on any CPU: storage (the planned memory) unchanged, compute fp32, and the
    image is that of the all-fp32 model to within the bf16 rounding of the weights."""
    _force_compute(monkeypatch, "fp32", "fp32 compute: test")
    bf16 = OvisPipeline.from_pretrained(tiny_dir, device="cpu", preset="cpu", progress=False)
    assert bf16.dtype == torch.float32 and bf16.compute_reason == "fp32 compute: test"
    yak = bf16.model.visual_generator.backbone
    assert yak.img_in.weight.dtype == torch.bfloat16  # stored as planned
    result = bf16.generate("a fox", width=32, height=32, steps=2, seed=3)
    image = result.image
    assert result.stats.settings["dtype"] == "fp32"
    assert yak.img_in.weight.dtype == torch.bfloat16  # the fp32 copies live only inside each call
    _force_compute(monkeypatch, "bf16", "bf16 compute: test")
    native = OvisPipeline.from_pretrained(tiny_dir, device="cpu", preset="cpu", progress=False)
    assert native.dtype == torch.bfloat16 and native.cpu_hooks.fp32 is None
    assert image.size == native.generate("a fox", width=32, height=32, steps=2, seed=3).image.size


def test_an_explicit_dtype_wins(tiny_dir, monkeypatch):
    _force_compute(monkeypatch, "fp32", "fp32 compute: test")
    pipe = OvisPipeline.from_pretrained(tiny_dir, device="cpu", preset="cpu", dtype="bf16", progress=False)
    assert pipe.dtype == torch.bfloat16 and pipe.compute_reason is None


def test_the_planner_counts_fp32_activations_on_a_cpu():
    from lite.runtime.planning import preset_workload
    from lite.runtime.presets import PRESETS

    assert preset_workload(PRESETS["cpu"], "t2i", 512, 512, "cpu").dtype_bytes == 4
    assert preset_workload(PRESETS["balanced"], "t2i", 512, 512, "cuda").dtype_bytes == 2


def test_fp32_compute_around_quantized_layers(tiny_dir, monkeypatch):
    """quanto/bnb layers keep their own kernel and dtype; the tree around them stays fp32 (an attention mixing
    an fp32 query with a bf16 value from a quantized projection would refuse to run)."""
    import warnings

    _force_compute(monkeypatch, "fp32", "fp32 compute: test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = OvisPipeline.from_pretrained(tiny_dir, device="cpu", preset="balanced", progress=False)
    assert pipe.dtype == torch.float32
    assert pipe.generate("a fox", width=32, height=32, steps=1).image.size == (32, 32)
    assert isinstance(pipe.understand([], "What is it?", max_new_tokens=2).text, str)
