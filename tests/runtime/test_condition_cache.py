"""The condition cache: a repeated generation or edit reuses its refined conditions and gives bitwise the image
computed without the cache; keys tell apart what changes a condition; the cache stays inside its byte budget."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lite.runtime.caches import RuntimeCaches
from lite.runtime.condition_cache import condition_key, image_digest
from lite.runtime.pipeline import OvisPipeline

SIZE = dict(width=48, height=32, steps=2)


@pytest.fixture(autouse=True)
def fresh_caches(pipe: OvisPipeline):
    pipe.caches = RuntimeCaches()  # counters from zero for each test
    yield


def _conditions(pipe: OvisPipeline) -> dict:
    return pipe.last_run.cache["conditions"]


def _source() -> Image.Image:
    pixels = np.random.default_rng(5).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_a_repeated_generate_hits_the_cache_and_gives_the_same_bits_as_without_it(pipe: OvisPipeline) -> None:
    first = pipe.generate("a red fox", seed=1, **SIZE)
    assert _conditions(pipe)["misses"] == 2 and _conditions(pipe)["hits"] == 0  # cond and no_both computed
    cached = pipe.generate("a red fox", seed=2, **SIZE)
    assert _conditions(pipe)["hits"] == 2 and _conditions(pipe)["entries"] == 2
    assert "conditions" in pipe.last_run.phases
    pipe.caches.set_enabled(False)
    uncached = pipe.generate("a red fox", seed=2, **SIZE)
    assert pipe.last_run.cache["enabled"] is False and _conditions(pipe)["entries"] == 0
    assert np.array_equal(np.asarray(cached.image), np.asarray(uncached.image))
    assert not np.array_equal(np.asarray(first.image), np.asarray(cached.image))  # the seed still matters


def test_num_images_computes_the_conditions_once(pipe: OvisPipeline) -> None:
    images = pipe.generate("a blue bird", num_images=3, seed=4, **SIZE)
    assert len(images) == 3 and _conditions(pipe)["misses"] == 2 and _conditions(pipe)["hits"] == 0


def test_a_repeated_edit_reuses_all_three_conditions_bitwise(pipe: OvisPipeline) -> None:
    source = _source()
    pipe.edit(source, "make it night", steps=2, seed=3)
    assert _conditions(pipe)["misses"] == 3
    cached = pipe.edit(source.copy(), "make it night", steps=2, seed=3)  # an equal picture, another object
    assert _conditions(pipe)["hits"] == 3
    pipe.caches.set_enabled(False)
    assert np.array_equal(np.asarray(cached.image), np.asarray(pipe.edit(source, "make it night", steps=2, seed=3).image))


def test_prompt_negative_prompt_and_size_each_miss(pipe: OvisPipeline) -> None:
    pipe.generate("a red fox", seed=1, **SIZE)
    pipe.generate("a red fox", seed=1, negative_prompt="blurry", **SIZE)  # cond hits, the negative branch misses
    assert (_conditions(pipe)["hits"], _conditions(pipe)["misses"]) == (1, 3)
    pipe.generate("a red fox", seed=1, width=64, height=32, steps=2)  # another canvas: both miss
    assert (_conditions(pipe)["hits"], _conditions(pipe)["misses"]) == (1, 5)


def test_a_small_byte_budget_evicts_the_least_recently_used_condition(pipe: OvisPipeline) -> None:
    pipe.generate("a red fox", seed=1, **SIZE)
    held = _conditions(pipe)["bytes"]  # the fox's cond and the shared no_both
    budget = int(1.3 * held)  # room for two conditions of these lengths, not three
    pipe.caches.conditions.set_budget(budget)
    pipe.generate("a green frog", seed=1, **SIZE)  # no_both is the fox's (same negative, same canvas): a hit
    stats = _conditions(pipe)
    assert stats["bytes"] <= budget and stats["evictions"] == 1 and stats["entries"] == 2
    assert (stats["hits"], stats["misses"]) == (1, 3)
    pipe.generate("a red fox", seed=1, **SIZE)  # the least recently used, the fox's cond, was evicted
    assert _conditions(pipe)["misses"] == 4


def test_keys_follow_the_pixels_not_the_object() -> None:
    a = Image.new("RGB", (8, 4), "white")
    assert image_digest(a) == image_digest(Image.new("RGB", (8, 4), (255, 255, 255)))
    b = a.copy()
    b.putpixel((3, 2), (255, 255, 254))
    assert image_digest(a) != image_digest(b)
    assert image_digest(a) != image_digest(Image.new("RGB", (4, 8), "white"))  # same bytes, other shape
    assert condition_key("x", a) != condition_key("y", a)
