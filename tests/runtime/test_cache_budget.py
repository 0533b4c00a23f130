"""Caches against the device budget: an out-of-memory retry drops them first, and a plan on a (CPU-simulated)
small card reserves the bytes they can reach, or shrinks them to what the plan leaves (nothing, when it leaves
nothing). tests/runtime/test_cache_device_plan.py follows a chat on such a card."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lite.runtime.caches import DEVICE_SHARE, RuntimeCaches
from lite.runtime.condition_cache import condition_key
from lite.runtime.pipeline import OvisPipeline
from lite.runtime.planning import plan_workload
from lite.model.processing import T2I_PREFIX

SIZE = dict(width=48, height=32, steps=2)


@pytest.fixture(autouse=True)
def fresh(pipe: OvisPipeline):
    pipe.caches = RuntimeCaches()
    pipe.disable_offload()
    notes: list[str] = []
    pipe.notify = notes.append
    yield notes
    pipe.disable_offload()


def test_an_out_of_memory_retry_drops_the_caches_first(pipe: OvisPipeline, fresh: list[str]) -> None:
    pipe.generate("a red fox", seed=1, **SIZE)
    fox = condition_key(T2I_PREFIX + "a red fox", Image.new("RGB", (48, 32), (255, 255, 255)))
    assert fox in pipe.caches.conditions
    held = pipe.caches.bytes
    fired: list[int] = []

    def oom(*_):
        if not fired:
            fired.append(1)
            assert pipe.caches.bytes > 0  # still held when the device runs out
            raise torch.OutOfMemoryError("simulated device OOM")

    handle = pipe.model.visual_generator.backbone.double_blocks[0].register_forward_pre_hook(oom)
    try:
        pipe.generate("a green frog", seed=1, **SIZE)
    finally:
        handle.remove()
    assert len(fresh) == 1 and "of caches; retrying once" in fresh[0]
    assert fox not in pipe.caches.conditions  # dropped before the retry, not evicted by the budget
    assert pipe.caches.conditions.counters.evictions == 0
    # misses: the fox's two; the frog's first try, its cond (no_both was the fox's); the retry, both again
    assert pipe.last_run.cache["conditions"]["misses"] == 2 + 1 + 2 and held > 0


def _workload(pipe: OvisPipeline):
    return pipe.workload("t2i", 48, 32, nfe=4)


def test_a_small_card_plan_reserves_what_the_caches_can_reach(pipe: OvisPipeline) -> None:
    wl = _workload(pipe)
    cfg, pp = pipe.model.config, pipe.pp
    minimum = plan_workload(pipe.model, cfg, pp, wl, 1 << 40)[1].min_budget_bytes
    budget = 2 * minimum
    pipe.enable_offload(budget, simulate=True)
    reach = pipe.caches.reach_bytes
    assert 0 < reach <= DEVICE_SHARE * budget  # paging starts: the caches get their share of the card
    pipe.caches.conditions.put("kept", torch.zeros(64 << 8))  # 64 KiB of float32 held now
    _, with_cache = pipe.offload.plan_for(wl)
    _, alone = plan_workload(pipe.model, cfg, pp, wl, budget - reach)  # independent: the card minus the caches
    assert with_cache.reserve_bytes == reach  # what they can reach, not the 64 KiB they hold now
    assert with_cache.resident_units == alone.resident_units
    assert with_cache.planned_peak_bytes + reach <= budget
    assert with_cache.min_budget_bytes == alone.min_budget_bytes + reach


def test_caches_that_a_plan_cannot_fit_beside_get_no_room(pipe: OvisPipeline, fresh: list[str]) -> None:
    wl = _workload(pipe)
    minimum = plan_workload(pipe.model, pipe.model.config, pipe.pp, wl, 1 << 40)[1].min_budget_bytes
    pipe.enable_offload(minimum, simulate=True)  # a card with room for the plan and nothing else
    pipe.caches.conditions.put("kept", torch.zeros(1024))
    assert "kept" in pipe.caches.conditions
    _, planned = pipe.offload.plan_for(wl)
    assert pipe.caches.bytes == 0 and pipe.caches.reach_bytes == 0 and "kept" not in pipe.caches.conditions
    assert planned.planned_peak_bytes + planned.reserve_bytes <= minimum
    assert any("device budget shrinks to 0 B" in n for n in fresh)
    pipe.generate("a red fox", seed=1, **SIZE)  # and the run goes on, keeping nothing on the full card
    assert pipe.caches.bytes == 0
