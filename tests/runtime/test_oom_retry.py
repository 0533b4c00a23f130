"""A device out-of-memory mid-run is retried once with a plan that fits; a second one is one clean line."""

from __future__ import annotations

import re

import pytest
import torch

from offload import module_nbytes
from lite.errors import InputError
from lite.runtime.pipeline import OvisPipeline


@pytest.fixture()
def pipe(tiny_dir):
    return OvisPipeline.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32, progress=False)


def _oom(pipe: OvisPipeline, times: int):
    fired: list[int] = []

    def hook(*_):
        if len(fired) < times:
            fired.append(1)
            raise torch.OutOfMemoryError("simulated device OOM")

    return pipe.model.visual_generator.backbone.double_blocks[0].register_forward_pre_hook(hook)


UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def _plans(notice: str) -> list[int]:
    """The plan sizes a notice names, in bytes."""
    return [int(float(x) * UNITS[u]) for x, u in re.findall(r"a (\d+(?:\.\d+)?) (B|KiB|MiB|GiB) plan", notice)]


def test_a_resident_run_retries_with_a_budget_that_is_neither_zero_nor_below_the_minimum(pipe):
    expected = pipe.generate("a red fox", width=48, height=32, steps=2, seed=1).image
    notes: list[str] = []
    pipe.notify = notes.append
    handle = _oom(pipe, 1)
    try:
        out = pipe.generate("a red fox", width=48, height=32, steps=2, seed=1).image
    finally:
        handle.remove()
    assert list(out.getdata()) == list(expected.getdata())
    assert len(notes) == 1 and "retrying once" in notes[0]
    failed, retry = _plans(notes[0])
    weights = module_nbytes(pipe.model)
    # the failed run held every weight; the retry plans 0.75x of that, or the minimum if that is more
    assert failed == pytest.approx(weights, rel=0.01)
    minimum = pipe.offload.plan.min_budget_bytes
    assert retry == pytest.approx(max(0.75 * weights, minimum), rel=0.01)
    assert pipe.offload.settings.budget_bytes >= minimum


def test_a_second_out_of_memory_is_one_clean_line(pipe):
    handle = _oom(pipe, 2)
    try:
        with pytest.raises(InputError) as info:
            pipe.generate("a red fox", width=48, height=32, steps=2, seed=1)
    finally:
        handle.remove()
    message = str(info.value)
    assert "\n" not in message and "out of device memory even with" in message
    assert _plans(message) and _plans(message)[0] > 0
