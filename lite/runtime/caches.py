"""The one home of the runtime's caches: byte-bounded LRUs the pipeline holds between calls.

A chat follow-up, a second image with the same prompt and a repeated API request all recompute work
an earlier call already did (the ViT over the same image, the LLM over the same prefix, the same
conditions). Each cache here keeps such results by a key, accounts their bytes, and evicts the least
recently used entries past a byte budget, so the memory it holds is bounded and reportable.

    caches = RuntimeCaches(budget_bytes=2 << 30)
    hit = caches.vision.get(key)              # None on a miss
    caches.vision.put(key, value, nbytes)     # evicts LRU entries past the vision budget
    caches.stats()                            # a plain dict for --json and /metrics
    caches.clear()                            # what an out-of-memory retry does first

Values are opaque to the cache; `tensor_bytes` sums the bytes of the tensors inside a value.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_BUDGET_BYTES = 2 << 30  # host bytes across all caches unless told otherwise
#: On a device that pages weights inside a budget, the caches may hold at most this share of it (capped by the
#: default): the plan reserves that much beside the weights, so a chat's KV (~0.13 GB for 1,100 full-size
#: positions) stays on a 4 GB card without paging most of the model.
DEVICE_SHARE = 0.125
# Each cache's share of a total budget: prefix KV of a few conversations dominates, a ViT output is small.
PREFIX_SLOTS = 4  # conversations whose KV is kept at most (a few, like llama-server slots; bytes bound them too)
SHARES = {"vision": 0.15, "prefix_kv": 0.6, "conditions": 0.25}


def tensor_bytes(value: Any) -> int:
    """Bytes kept alive by the tensors reachable through tuples, lists, dicts and dataclasses in `value`: each
    distinct storage once, whole (a kept view of a larger buffer holds all of it; a budget counting only the
    view would let the cache hold more than it says)."""
    seen: set[int] = set()

    def walk(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = storage.data_ptr() or id(obj)  # an empty storage's pointer is 0
            if key in seen:
                return 0
            seen.add(key)
            return storage.nbytes()
        if isinstance(obj, dict):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v) for v in obj)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return sum(walk(getattr(obj, f.name)) for f in dataclasses.fields(obj))
        return 0

    return walk(value)


@dataclass
class CacheStats:
    """Counters of one cache since it was made (`clear` drops entries, not counters)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    extra: dict[str, int] = dataclasses.field(default_factory=dict)  # what a cache's user counts (reused tokens)


class ByteLRU:
    """A least-recently-used map whose entries carry their byte size, bounded by `budget_bytes`.

    An entry larger than the whole budget is not kept (storing it would evict everything else and then
    itself). `max_entries` bounds the count too (llama-server's "slots"). `enabled=False` makes every `get`
    a miss and every `put` a no-op.
    """

    def __init__(self, name: str, budget_bytes: int, enabled: bool = True, max_entries: int | None = None) -> None:
        if budget_bytes < 0:
            raise ValueError(f"cache budget must be >= 0 bytes, got {budget_bytes}")
        self.name = name
        self.budget_bytes = budget_bytes
        self.enabled = enabled
        self.max_entries = max_entries
        self.counters = CacheStats()
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: Hashable) -> Any | None:
        """The value for `key` (now the most recently used), or None; counts a hit or a miss."""
        if self.enabled and key in self._entries:
            self._entries.move_to_end(key)
            self.counters.hits += 1
            return self._entries[key][0]
        self.counters.misses += 1
        return None

    def peek(self, key: Hashable) -> Any | None:
        """The value for `key` without counting or reordering (for scans such as a longest-prefix search)."""
        entry = self._entries.get(key) if self.enabled else None
        return None if entry is None else entry[0]

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        return list(self._entries) if self.enabled else []

    def touch(self, key: Hashable) -> None:
        """Mark `key` as used (a hit found by scanning with `peek`)."""
        if key in self._entries:
            self._entries.move_to_end(key)
            self.counters.hits += 1

    def miss(self) -> None:
        """Count a miss found by scanning with `peek`."""
        self.counters.misses += 1

    def count(self, name: str, n: int = 1) -> None:
        """Add `n` to a counter of the cache's user (reported by `stats`, e.g. prefix tokens reused)."""
        self.counters.extra[name] = self.counters.extra.get(name, 0) + n

    def put(self, key: Hashable, value: Any, nbytes: int | None = None) -> bool:
        """Store `value` (its bytes measured with `tensor_bytes` unless given); False when not kept."""
        if not self.enabled:
            return False
        size = tensor_bytes(value) if nbytes is None else nbytes
        self.pop(key)
        if size > self.budget_bytes:
            return False
        self._entries[key] = (value, size)
        self._bytes += size
        self._evict(self.budget_bytes)
        return True

    def make_room(self, nbytes: int) -> bool:
        """Evict LRU entries until one more entry of `nbytes` fits the budget and the entry count, before it is
        built (a snapshot's copy would otherwise exist beside a full cache); False when it can never fit."""
        if not self.enabled or nbytes > self.budget_bytes:
            return False
        slots = None if self.max_entries is None else self.max_entries - 1
        while self._entries and (self._bytes + nbytes > self.budget_bytes or
                                 (slots is not None and len(self._entries) > slots)):
            _, (_, size) = self._entries.popitem(last=False)
            self._bytes -= size
            self.counters.evictions += 1
        return True

    def pop(self, key: Hashable) -> Any | None:
        """Remove `key` and return its value (None when absent); not an eviction."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self._bytes -= entry[1]
        return entry[0]

    def set_budget(self, budget_bytes: int) -> None:
        """A new bound, evicting down to it at once."""
        self.budget_bytes = max(budget_bytes, 0)
        self._evict(self.budget_bytes)

    def clear(self) -> int:
        """Drop every entry; returns the bytes freed."""
        freed = self._bytes
        self._entries.clear()
        self._bytes = 0
        return freed

    def _evict(self, limit: int) -> None:
        while self._entries and (self._bytes > limit or
                                 (self.max_entries is not None and len(self._entries) > self.max_entries)):
            _, (_, size) = self._entries.popitem(last=False)
            self._bytes -= size
            self.counters.evictions += 1

    def stats(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "entries": len(self._entries), "bytes": self._bytes,
                "budget_bytes": self.budget_bytes, "hits": self.counters.hits, "misses": self.counters.misses,
                "evictions": self.counters.evictions, **self.counters.extra}


class RuntimeCaches:
    """The caches an `OvisPipeline` holds as `pipe.caches`: `vision` (ViT outputs by image digest),
    `prefix_kv` (the LLM's KV of recent conversations) and `conditions` (refined generation conditions).

    `budget_bytes` is split by `SHARES`; `enabled=False` turns all of them off (`--no-cache`).
    """

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES, enabled: bool = True) -> None:
        self.vision = ByteLRU("vision", 0, enabled)
        self.prefix_kv = ByteLRU("prefix_kv", 0, enabled, max_entries=PREFIX_SLOTS)
        self.conditions = ByteLRU("conditions", 0, enabled)
        self.budget_bytes = 0
        self.set_budget(budget_bytes)

    def all(self) -> Iterable[ByteLRU]:
        return (self.vision, self.prefix_kv, self.conditions)

    @property
    def enabled(self) -> bool:
        return any(cache.enabled for cache in self.all())

    @property
    def bytes(self) -> int:
        """Bytes held by all caches now (what a planner adds to a run's peak)."""
        return sum(cache.bytes for cache in self.all())

    @property
    def reach_bytes(self) -> int:
        """The most the caches can ever hold at once (the enabled caches' budgets): what a plan reserves."""
        return sum(cache.budget_bytes for cache in self.all() if cache.enabled)

    def limit(self, budget_bytes: int) -> int:
        """Bound the caches to at most `budget_bytes` in all (a device's share, or what a plan leaves), never
        above `DEFAULT_BUDGET_BYTES`; returns the bytes evicted."""
        before = self.bytes
        self.set_budget(min(max(budget_bytes, 0), DEFAULT_BUDGET_BYTES))
        return before - self.bytes

    def set_budget(self, budget_bytes: int) -> None:
        """A new total bound, split by `SHARES`; entries past a cache's new share are evicted."""
        if budget_bytes < 0:
            raise ValueError(f"cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        for cache in self.all():
            cache.set_budget(int(budget_bytes * SHARES[cache.name]))

    def set_enabled(self, enabled: bool) -> None:
        """Turn every cache on or off; turning off drops what they hold."""
        for cache in self.all():
            cache.enabled = enabled
            if not enabled:
                cache.clear()

    def clear(self) -> int:
        """Drop every entry of every cache (an OOM retry's first step, the chat's /clear); bytes freed."""
        return sum(cache.clear() for cache in self.all())

    def stats(self) -> dict[str, Any]:
        """{"enabled", "bytes", "budget_bytes", and per cache: entries, bytes, hits, misses, evictions}."""
        return {"enabled": self.enabled, "bytes": self.bytes, "budget_bytes": self.budget_bytes,
                **{cache.name: cache.stats() for cache in self.all()}}
