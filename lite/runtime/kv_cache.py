"""The LLM's KV cache for understanding: preallocated per layer, and kept between calls by prefix.

transformers' `DynamicLayer` concatenates at every token, copying the whole cache per layer per step
(about 126 MB per token for a full-size 1100-position chat). `BufferLayer` writes into a buffer sized
for the prompt and the answer and hands out views, growing by doubling only if a call outlives it.

A finished (or stopped) answer leaves its KV as a `KVSnapshot`: the identity of every position it
holds (token ids; an image's positions as `(digest, index)`) and the per-layer tensors. The next call
finds the snapshot sharing the longest prefix with its own positions (`longest_prefix`) and prefills
only the rest, like llama.cpp's `cache_prompt` slots.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lite.runtime.caches import ByteLRU

PositionKey = tuple[Hashable, ...]


class BufferLayer(DynamicLayer):
    """One decoder layer's keys and values in a [batch, kv_heads, capacity, head_dim] buffer."""

    def __init__(self, capacity: int, keys: torch.Tensor | None = None, values: torch.Tensor | None = None) -> None:
        super().__init__()
        self.capacity = max(capacity, 1)
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        if keys is not None and values is not None:
            self.update(keys, values)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        b, h, _, d = key_states.shape
        self._k = key_states.new_empty((b, h, self.capacity, d))
        self._v = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def _grow(self, needed: int) -> None:
        assert self._k is not None and self._v is not None
        self.capacity = max(needed, 2 * self.capacity)
        k, v = self._k, self._v
        self._k = k.new_empty((*k.shape[:2], self.capacity, k.shape[-1]))
        self._v = v.new_empty((*v.shape[:2], self.capacity, v.shape[-1]))
        self._k[:, :, :self.length].copy_(k[:, :, :self.length])
        self._v[:, :, :self.length].copy_(v[:, :, :self.length])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self._k is not None and self._v is not None
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._grow(end)
        self._k[:, :, self.length:end].copy_(key_states)
        self._v[:, :, self.length:end].copy_(value_states)
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and self.is_initialized:
            self.length = max(self.length + tokens_to_remove, 0)
            assert self._k is not None and self._v is not None
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def reset(self) -> None:
        self.length = 0
        self._k = self._v = None
        super().reset()


@dataclass
class KVSnapshot:
    """The KV of `len(positions)` positions, one (keys, values) pair per layer, each [1, h, >=n, d]."""

    positions: PositionKey
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return len(self.positions)

    def nbytes(self) -> int:
        """Bytes the snapshot keeps alive: its tensors' storages (a view of a larger buffer holds all of it)."""
        return storage_bytes((*self.keys, *self.values))


def storage_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages under `tensors`."""
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def new_cache(num_layers: int, capacity: int, prefix: KVSnapshot | None = None, reuse: int = 0) -> Cache:
    """A cache with room for `capacity` positions, its first `reuse` filled from `prefix` (copied: the
    snapshot stays intact for other conversations)."""
    if prefix is None or reuse == 0:
        return Cache(layers=[BufferLayer(capacity) for _ in range(num_layers)])
    return Cache(layers=[BufferLayer(capacity, k[:, :, :reuse], v[:, :, :reuse])
                         for k, v in zip(prefix.keys, prefix.values)])


def snapshot(cache: Cache, positions: PositionKey) -> KVSnapshot:
    """The cache's first `len(positions)` positions; copied compactly when the buffers are mostly unused."""
    n = len(positions)
    keys, values = [], []
    for layer in cache.layers:
        assert isinstance(layer, BufferLayer) and layer.length >= n
        k, v = layer.keys[:, :, :n], layer.values[:, :, :n]
        if layer.capacity > n + n // 4:  # more than a quarter unused: keep only what is held
            k, v = k.clone(), v.clone()
        keys.append(k)
        values.append(v)
    return KVSnapshot(positions, keys, values)


def common_prefix(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common prefix of two position keys."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def longest_prefix(store: ByteLRU, positions: PositionKey) -> tuple[KVSnapshot | None, int]:
    """The stored snapshot sharing the longest prefix with `positions`, and that length (a hit when > 0)."""
    best: KVSnapshot | None = None
    best_key: Hashable = None
    best_len = 0
    for key in store.keys():
        snap = store.peek(key)
        if isinstance(snap, KVSnapshot):
            n = common_prefix(snap.positions, positions)
            if n > best_len:
                best, best_key, best_len = snap, key, n
    if best is None:
        store.miss()
        return None, 0
    store.touch(best_key)
    return best, best_len


def remember(store: ByteLRU, snap: KVSnapshot) -> None:
    """Keep `snap`, dropping stored snapshots it extends (their every position is in it)."""
    _drop_extended(store, snap.positions)
    store.put(snap.positions, snap, snap.nbytes())


def keep(store: ByteLRU, cache: Cache, positions: PositionKey) -> None:
    """Remember the first `len(positions)` positions of `cache`, making room in `store` before the snapshot's
    copy is made: the store's bytes stay within its budget at every moment (the plan reserves that budget)."""
    _drop_extended(store, positions)
    n = len(positions)
    layers = [layer for layer in cache.layers if isinstance(layer, BufferLayer) and layer._k is not None]
    compact = sum(t[:, :, :n].numel() * t.element_size() for layer in layers for t in (layer._k, layer._v))
    whole = sum(storage_bytes((layer._k, layer._v)) for layer in layers)
    if store.make_room(compact if any(layer.capacity > n + n // 4 for layer in layers) else whole):
        remember(store, snapshot(cache, positions))


def _drop_extended(store: ByteLRU, positions: PositionKey) -> None:
    for key in store.keys():
        held = store.peek(key)
        if isinstance(held, KVSnapshot) and held.length <= len(positions) and \
                common_prefix(held.positions, positions) == held.length:
            store.pop(key)
