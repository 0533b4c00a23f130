"""Refined generation conditions kept between calls, keyed by what they are computed from.

A condition (ViT over the canvas or source image, the LLM, the token refiner) depends only on its text
(the prompt, the negative prompt, or the instruction) and its image (the white canvas of the requested
size, or the stretched source image). A second image with the same settings (a new seed, a repeated API
call, the server's `n`, the page's "again") therefore reuses the refined tensors unchanged, and the
denoiser sees exactly the same inputs: the image is bitwise the one computed without the cache.

The values live in `RuntimeCaches.conditions` (lite/runtime/caches.py: byte-bounded, LRU, counted).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import NamedTuple

from PIL import Image

from lite.model.modeling_yak import RefinedText
from lite.runtime.caches import ByteLRU
from lite.runtime.denoise import Condition


class ConditionKey(NamedTuple):
    """The text and a digest of the image a condition is computed from (the image's size is in the digest)."""

    content: str
    image: str


def image_digest(image: Image.Image) -> str:
    """blake2b of an image's mode, size and pixels: equal digests mean the same picture as given."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def condition_key(content: str, image: Image.Image) -> ConditionKey:
    return ConditionKey(content, image_digest(image))


def refined_condition(cache: ByteLRU, content: str, image: Image.Image,
                      compute: Callable[[str, Image.Image], Condition]) -> RefinedText:
    """The refined condition for (content, image): from `cache` when there, else `compute(content, image)`'s, kept.

    The stored tensors are handed out as they are (the denoiser only reads them), so a hit costs a digest.
    """
    key = condition_key(content, image)
    hit = cache.get(key)
    if hit is not None:
        return hit
    value = compute(content, image).text
    cache.put(key, value)
    return value
