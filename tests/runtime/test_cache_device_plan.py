"""A chat on a (CPU-simulated) small card that pages its weights: the caches, the prefix KV included, never hold
more than the plan in force reserved for them, at any put and at the moment a KV snapshot's copy is made; the
KV lives on the compute device while the plan leaves it room, and nowhere when it leaves none, with the same
answers either way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from offload import BudgetError

from lite.model.processing import Turn
from lite.runtime import kv_cache
from lite.runtime.caches import DEVICE_SHARE, ByteLRU, RuntimeCaches
from lite.runtime.kv_cache import KVSnapshot, keep, new_cache
from lite.runtime.pipeline import OvisPipeline
from lite.runtime.planning import plan_workload

QUESTIONS = ("What is it?", "And its colours?", "Why?")


@pytest.fixture(autouse=True)
def fresh(pipe: OvisPipeline):
    pipe.caches = RuntimeCaches()
    pipe.disable_offload()
    yield
    pipe.disable_offload()


def _image() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))


def _minimum(pipe: OvisPipeline) -> int:
    """The smallest budget any plan of a turn fits (every weight paged, the smallest LLM groups)."""
    wl = pipe.workload("understand", 56, 56, max_new_tokens=6, num_images=1)
    with pytest.raises(BudgetError) as refused:
        plan_workload(pipe.model, pipe.model.config, pipe.pp, wl, 1)
    return refused.value.min_budget_bytes


def _chat(pipe: OvisPipeline, watch: list[int] | None = None) -> list[tuple[str, int, int]]:
    """Three turns resending the conversation; per turn the answer, the plan's reserve and the most the caches
    held at any watched moment of that turn."""
    image, history, out = _image(), [], []
    for question in QUESTIONS:
        text = str(pipe.understand([image], question, history=list(history), max_new_tokens=6))
        plan = pipe.offload.plan
        out.append((text, plan.reserve_bytes if plan else -1, max(watch, default=0) if watch is not None else 0))
        if watch is not None:
            watch.clear()
        history.append(Turn(question, text, num_images=0 if history else 1))
    return out


def _watch_caches(pipe: OvisPipeline, monkeypatch) -> list[int]:
    """The caches' bytes after every put, and beside each KV snapshot's copy when it is made."""
    seen: list[int] = []
    real_put, real_snapshot = ByteLRU.put, kv_cache.snapshot

    def put(self, *args, **kwargs):
        kept = real_put(self, *args, **kwargs)
        seen.append(pipe.caches.bytes)
        return kept

    def snapshot(cache, positions):
        snap = real_snapshot(cache, positions)
        buffers = {t.untyped_storage().data_ptr() for layer in cache.layers for t in (layer._k, layer._v)}
        extra = sum(t.untyped_storage().nbytes() for t in (*snap.keys, *snap.values)
                    if t.untyped_storage().data_ptr() not in buffers)
        seen.append(pipe.caches.bytes + extra)  # a copy exists beside what the caches hold
        return snap

    monkeypatch.setattr(ByteLRU, "put", put)
    monkeypatch.setattr(kv_cache, "snapshot", snapshot)
    return seen


def test_a_chat_on_a_small_card_keeps_the_caches_inside_the_plans_reserve(pipe: OvisPipeline, monkeypatch) -> None:
    budget = 2 * _minimum(pipe)
    pipe.enable_offload(budget, simulate=True)
    watch = _watch_caches(pipe, monkeypatch)
    turns = _chat(pipe, watch)
    for _, reserve, most in turns:
        assert 0 < most <= reserve <= DEVICE_SHARE * budget
    plan = pipe.offload.plan
    assert plan.planned_peak_bytes + plan.reserve_bytes <= budget
    assert pipe.last_run.cache["prefix_tokens_reused"] > 0  # the KV was kept, within the reserve
    snaps = [pipe.caches.prefix_kv.peek(key) for key in pipe.caches.prefix_kv.keys()]
    assert snaps and all(t.device == pipe.device for snap in snaps for t in (*snap.keys, *snap.values))


def test_a_card_with_no_room_beside_the_plan_keeps_no_kv_and_answers_the_same(pipe: OvisPipeline) -> None:
    plain = [text for text, _, _ in _chat(pipe)]  # no paging: the caches on the host
    pipe.caches = RuntimeCaches()
    pipe.enable_offload(_minimum(pipe), simulate=True)  # room for the plan and nothing else
    turns = _chat(pipe)
    assert [text for text, _, _ in turns] == plain
    assert all(reserve == 0 for _, reserve, _ in turns)
    assert pipe.caches.bytes == 0 and len(pipe.caches.prefix_kv) == 0
    assert pipe.last_run.cache["prefix_tokens_reused"] == 0


def test_a_kept_view_counts_its_whole_buffer() -> None:
    buffer = torch.zeros(1, 2, 100, 8)
    snap = KVSnapshot(tuple(range(90)), [buffer[:, :, :90]], [buffer[:, :, :90].clone()])
    assert snap.nbytes() == buffer.numel() * 4 + 90 * 16 * 4  # the view keeps all 100 positions alive


def test_a_snapshot_copy_is_made_only_after_the_store_has_room(monkeypatch) -> None:
    def filled(n: int, capacity: int):
        cache = new_cache(1, capacity)
        cache.layers[0].update(torch.ones(1, 2, n, 8), torch.ones(1, 2, n, 8))
        return cache

    one = 2 * 10 * 16 * 4  # keys and values of 10 positions, float32
    store = ByteLRU("prefix_kv", budget_bytes=int(1.5 * one), max_entries=4)
    keep(store, filled(10, 40), tuple(range(100, 110)))  # compacted: its capacity is 4x what it holds
    assert store.bytes == one
    seen: list[int] = []
    real = kv_cache.snapshot
    monkeypatch.setattr(kv_cache, "snapshot", lambda c, p: (seen.append(store.bytes), real(c, p))[1])
    keep(store, filled(10, 40), tuple(range(200, 210)))  # an unrelated conversation: the first must go first
    assert seen == [0] and store.bytes == one and len(store) == 1
    keep(store, filled(30, 40), tuple(range(300, 330)))  # larger than the whole budget: never copied
    assert seen == [0] and len(store) == 1
