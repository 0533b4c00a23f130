"""The byte-bounded LRU and the pipeline's cache container, checked against hand-counted bytes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from lite.runtime.caches import SHARES, ByteLRU, RuntimeCaches, tensor_bytes


def test_tensor_bytes_counts_nested_tensors_once() -> None:
    a = torch.zeros(10, dtype=torch.float32)  # 40 bytes
    b = torch.zeros(3, 4, dtype=torch.bfloat16)  # 24 bytes

    @dataclass
    class Holder:
        x: torch.Tensor
        rest: list

    assert tensor_bytes({"k": (a, [b, a]), "n": 3}) == 64
    assert tensor_bytes(Holder(a, [b, "text"])) == 64


def test_eviction_under_a_small_byte_budget_is_least_recently_used() -> None:
    cache = ByteLRU("t", budget_bytes=100)
    assert cache.put("a", "A", 40) and cache.put("b", "B", 40)
    assert cache.get("a") == "A"  # a is now the most recent: b goes first
    assert cache.put("c", "C", 40)
    assert "b" not in cache and cache.keys() == ["a", "c"]
    assert cache.bytes == 80
    assert cache.get("b") is None
    s = cache.stats()
    assert (s["hits"], s["misses"], s["evictions"], s["entries"]) == (1, 1, 1, 2)
    cache.put("d", "D", 90)  # needs both gone
    assert cache.keys() == ["d"] and cache.bytes == 90 and cache.stats()["evictions"] == 3


def test_entry_larger_than_budget_is_not_kept_and_keeps_the_rest() -> None:
    cache = ByteLRU("t", budget_bytes=100)
    cache.put("a", "A", 60)
    assert not cache.put("huge", "H", 101)
    assert cache.keys() == ["a"] and cache.bytes == 60


def test_replacing_a_key_accounts_bytes_once() -> None:
    cache = ByteLRU("t", budget_bytes=100)
    cache.put("a", "A", 60)
    cache.put("a", "A2", 30)
    assert cache.bytes == 30 and len(cache) == 1 and cache.peek("a") == "A2"


def test_disabled_cache_keeps_nothing_and_counts_misses() -> None:
    cache = ByteLRU("t", budget_bytes=100, enabled=False)
    assert not cache.put("a", "A", 1)
    assert cache.get("a") is None and cache.stats()["misses"] == 1 and cache.bytes == 0


def test_shrinking_the_budget_evicts_at_once() -> None:
    cache = ByteLRU("t", budget_bytes=100)
    for key in "abcd":
        cache.put(key, key, 25)
    cache.set_budget(50)
    assert cache.keys() == ["c", "d"] and cache.bytes == 50


def test_container_splits_budget_clears_and_reports() -> None:
    caches = RuntimeCaches(budget_bytes=1000)
    assert caches.vision.budget_bytes == int(1000 * SHARES["vision"])
    caches.vision.put("img", torch.zeros(25))  # 100 bytes, measured
    caches.prefix_kv.put("conv", torch.zeros(50))  # 200 bytes
    s = caches.stats()
    assert s["bytes"] == 300 and s["vision"]["bytes"] == 100 and s["prefix_kv"]["entries"] == 1
    assert set(s) >= {"enabled", "bytes", "budget_bytes", "vision", "prefix_kv", "conditions"}
    assert caches.clear() == 300 and caches.bytes == 0
    caches.set_enabled(False)
    assert not caches.enabled and not caches.conditions.put("x", torch.zeros(1))


def test_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="budget"):
        RuntimeCaches(budget_bytes=-1)
