"""The vision cache: an edit's source image is encoded once for its two conditions, a chat's image once for
all its turns, and the images are bitwise those computed without the cache."""

from __future__ import annotations

import numpy as np
from PIL import Image


def _count_vit_images(pipe, run) -> int:
    """Images the ViT backbone encoded while `run()` ran (counted from its grid argument)."""
    seen: list[int] = []
    backbone = pipe.model.visual_tokenizer.backbone
    handle = backbone.register_forward_pre_hook(lambda _m, args: seen.append(int(args[1].shape[0])))
    try:
        run()
    finally:
        handle.remove()
    return sum(seen)


def test_edit_encodes_its_source_once_and_matches_the_uncached_image(pipe) -> None:
    src = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    pipe.caches.clear()
    out: list = []
    encoded = _count_vit_images(pipe, lambda: out.append(pipe.edit(src, "make it red", steps=1, seed=3)))
    assert encoded == 2  # the source (cond and no_txt share it) and the white canvas (no_both): not 3
    pipe.caches.set_enabled(False)
    try:
        plain: list = []
        assert _count_vit_images(pipe, lambda: plain.append(pipe.edit(src, "make it red", steps=1, seed=3))) == 3
    finally:
        pipe.caches.set_enabled(True)
    assert np.array_equal(np.asarray(out[0].image), np.asarray(plain[0].image))


def test_a_chat_image_is_encoded_once_across_turns(pipe) -> None:
    from lite.model.processing import Turn

    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (56, 84, 3), dtype=np.uint8))
    pipe.caches.clear()
    first = _count_vit_images(pipe, lambda: pipe.understand(img, "What is it?", max_new_tokens=3))
    again = _count_vit_images(pipe, lambda: pipe.understand([img], "Why?", max_new_tokens=3,
                                                            history=[Turn("What is it?", "a thing", 1)]))
    assert (first, again) == (1, 0)
    assert pipe.caches.vision.stats()["hits"] >= 1
