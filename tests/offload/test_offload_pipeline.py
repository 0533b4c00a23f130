"""Offloading the Ovis-U1 pipeline: bitwise equivalence, the ledger within the plan, refusal, OOM retry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from offload import BudgetError, min_budget_bytes
from lite.model.memory_profile import Workload, activation_bytes, ovis_units
from lite.runtime.pipeline import OvisPipeline

SRC = Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return OvisPipeline.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32, progress=False)


TASKS = {
    "understand": lambda p: p.understand([SRC, SRC.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], "What is it?",
                                         max_new_tokens=5).text,
    "t2i": lambda p: np.asarray(p.generate("a red fox", width=48, height=32, steps=2, seed=1).image),
    "edit": lambda p: np.asarray(p.edit(SRC, "add a hat", steps=2, seed=2).image),
}
SIZES = {"understand": (64, 48), "t2i": (48, 32), "edit": (64, 48)}


def budgets(p: OvisPipeline, task: str, w: int, h: int) -> list[int]:
    wl = p.workload(task, w, h, nfe=4 if task == "t2i" else 6, max_new_tokens=5, num_images=2)
    act = activation_bytes(p.model.config, p.pp, wl)
    low = min(min_budget_bytes(ovis_units(p.model, wl, llm_group=g), act) for g in (4, 2, 1))
    high = sum(u.nbytes for u in ovis_units(p.model, wl)) + max(act.values())
    return [low, (low + high) // 2, high + 1]


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("prefetch", [0, 1])
def test_every_plan_is_bitwise_equal_to_resident(pipe, task, prefetch):
    resident = TASKS[task](pipe)
    try:
        for budget in budgets(pipe, task, *SIZES[task]):
            pipe.enable_offload(budget, prefetch_depth=prefetch, simulate=True)
            out = TASKS[task](pipe)
            out = TASKS[task](pipe)  # twice: the second call reuses the attached plan
            if isinstance(out, np.ndarray):
                assert np.array_equal(out, resident), (task, budget)
            else:
                assert out == resident, (task, budget)
            assert pipe.offload_plan.budget_bytes == budget
    finally:
        pipe.disable_offload()


def test_ledger_stays_inside_the_plan(pipe):
    try:
        for task, (w, h) in (("t2i", (48, 32)), ("edit", (64, 48))):
            for budget in budgets(pipe, task, w, h):
                pipe.enable_offload(budget, simulate=True)
                if task == "t2i":
                    pipe.generate("a red fox", width=w, height=h, steps=2, seed=1)
                else:
                    pipe.edit(SRC, "add a hat", steps=2, seed=2)
                plan, ledger = pipe.offload_plan, pipe.offloader.ledger
                assert ledger.peak_bytes <= budget
                for phase, peak in ledger.phase_peaks.items():
                    assert peak + plan.activation_bytes[phase] <= plan.phase_peaks[phase], (task, budget, phase)
    finally:
        pipe.disable_offload()


def test_impossible_budget_is_refused_with_the_minimum(pipe):
    wl = pipe.workload("t2i", 48, 32, nfe=4)
    act = activation_bytes(pipe.model.config, pipe.pp, wl)
    units = ovis_units(pipe.model, wl, llm_group=1)
    # independent minimum: per phase, largest outer unit + largest other unit + activations
    expected = 0
    for phase in ("conditions", "denoise", "decode"):
        used = [u for u in units if phase in u.phases]
        outer = max((u.nbytes for u in used if u.outer), default=0)
        inner = max((u.nbytes for u in used if not u.outer), default=0)
        expected = max(expected, outer + inner + act[phase])
    assert min_budget_bytes(units, act) == expected
    pipe.enable_offload(expected - 1, simulate=True)
    try:
        with pytest.raises(BudgetError, match=str(expected)):
            pipe.generate("a red fox", width=48, height=32, steps=2, seed=1)
    finally:
        pipe.disable_offload()


def test_out_of_memory_retries_once_with_a_smaller_plan(pipe):
    resident = np.asarray(pipe.generate("a red fox", width=48, height=32, steps=2, seed=1).image)
    notes: list[str] = []
    pipe.notify = notes.append
    big = budgets(pipe, "t2i", 48, 32)[-1] * 2
    pipe.enable_offload(big, simulate=True)
    fired = []

    def oom_once(*_):
        if not fired:
            fired.append(1)
            raise torch.OutOfMemoryError("simulated CUDA OOM")

    handle = pipe.model.visual_generator.backbone.double_blocks[0].register_forward_pre_hook(oom_once)
    try:
        out = np.asarray(pipe.generate("a red fox", width=48, height=32, steps=2, seed=1).image)
    finally:
        handle.remove()
        pipe.disable_offload()
        pipe.notify = lambda message: None
    assert np.array_equal(out, resident)
    assert len(notes) == 1 and "retrying once" in notes[0]


def test_workload_sizes_follow_the_task_rules():
    assert Workload("t2i", 1000, 1000).output_size == (992, 992)
    assert Workload("edit", 1920, 1080).output_size == (1312, 736)
    assert Workload("edit", 1024, 1024, steps=10).model_evaluations == 30
