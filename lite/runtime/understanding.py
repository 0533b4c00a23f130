"""An answer to a multimodal prompt, paying only for what is new since a recent call.

    vision   the ViT over images not in the vision cache (`lite.runtime.vision`)
    prefill  the LLM over the positions after the longest prefix a kept KV snapshot shares
    decode   one token per step (`lite.runtime.decode`), threads chosen from the cores' load now

A position's identity is its token id, or `(image digest, index)` inside an image, so a conversation
resent in full (the chat REPL, an OpenAI client) matches what the previous call left, its answer's
fed tokens included. Where the template's ids for an earlier answer differ from the tokens generated
(another tokenization of the same text, an edited turn), the match stops at the first different
position and the rest is prefilled: the result is always that of a full prefill.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from lite.model.processing import preprocess_image, tokenize_with_images, truncate_left
from lite.runtime.decode import Sampling, TextPieces, forward_last, generate_tokens, timed
from lite.runtime.decode_threads import CoreWindow
from lite.runtime.kv_cache import PositionKey, keep, longest_prefix, new_cache
from lite.runtime.vision import visual_embeddings


@dataclass
class Prompt:
    """The LLM's input for one call: embeddings [1, L, H] and the identity of each of the L positions."""

    embeds: torch.Tensor
    positions: PositionKey


def position_key(ids: list[int], image_atom: int, digests: list[str], sizes: list[int]) -> PositionKey:
    """Token ids, with each image atom expanded to its image's `(digest, index)` positions."""
    out: list[Any] = []
    image = 0
    for token in ids:
        if token == image_atom:
            out.extend((digests[image], i) for i in range(sizes[image]))
            image += 1
        else:
            out.append(token)
    return tuple(out)


def build_prompt(pipe: Any, text: str, images: list[Image.Image], clock: dict[str, float]) -> Prompt:
    """Tokens and images -> the LLM's input, images through the vision cache; truncated from the left
    like the reference (`multimodal_max_length`)."""
    model, caches = pipe.model, pipe.caches
    ids = tokenize_with_images(pipe.tokenizer, text)
    t0 = time.perf_counter()
    visual, digests = visual_embeddings(model, [preprocess_image(img, pipe.pp) for img in images], pipe.device,
                                        caches.vision) if images else ([], [])
    timed(clock, "vision", t0)
    embeds = model.merge_multimodal(ids.to(pipe.device), visual)
    positions = position_key(ids.tolist(), model.architecture.image_atom_id, digests, [v.shape[0] for v in visual])
    limit = model.config.multimodal_max_length
    if embeds.shape[1] > limit:
        embeds, positions = truncate_left(embeds, limit), positions[-limit:]
    return Prompt(embeds, positions)


def answer(pipe: Any, text: str, images: list[Image.Image], sampling: Sampling, max_new_tokens: int,
           stats: Any, start: float) -> Iterator[str]:
    """Text pieces of the answer as they are decoded (see `answer_tokens`)."""
    pieces = TextPieces(pipe.tokenizer)
    tokens = answer_tokens(pipe, text, images, sampling, max_new_tokens, stats, start)
    try:
        for token in tokens:
            yield from pieces.feed(token)
        yield from pieces.feed(None)
    finally:
        tokens.close()


def answer_tokens(pipe: Any, text: str, images: list[Image.Image], sampling: Sampling, max_new_tokens: int,
                  stats: Any, start: float) -> Iterator[int]:
    """Token ids of the answer as they are chosen; fills `stats.phases` (vision, prefill, decode, ttft:
    seconds since `start`), `stats.tokens` and `stats.cache`. Closing the iterator stops the decode
    cleanly, and what was computed up to then is kept for the next call."""
    model, caches = pipe.model, pipe.caches
    llm = model.llm
    clock: dict[str, float] = stats.phases
    with torch.no_grad():
        prompt = build_prompt(pipe, text, images, clock)
    store = caches.prefix_kv
    prefix, shared = longest_prefix(store, prompt.positions)
    reuse = min(shared, len(prompt.positions) - 1)  # the last position is always run: its logits pick token 1
    store.count("reused_tokens", reuse)
    new_tokens = len(prompt.positions) - reuse
    store.count("prefilled_tokens", new_tokens)
    stats.cache = {"prefix_tokens_reused": reuse, "prefill_tokens": new_tokens}
    window = CoreWindow.start() if pipe.device.type == "cpu" else None
    t0 = time.perf_counter()
    cache = new_cache(llm.config.num_hidden_layers, len(prompt.positions) + max_new_tokens, prefix, reuse)
    with torch.no_grad():
        logits = forward_last(llm, cache, inputs_embeds=prompt.embeds[:, reuse:])
    timed(clock, "prefill", t0)
    threads = None
    if window is not None:
        threads, reason = window.decode_threads(torch.get_num_threads())
        stats.settings["decode_threads"] = threads
        stats.settings["decode_threads_reason"] = reason
    fed: list[int] = []
    tokens = generate_tokens(llm, cache, logits, sampling, max_new_tokens, model.config.eos_token_id, fed)
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        while True:
            with torch.no_grad():
                token = next(tokens, None)
            if token is None:
                break
            if not stats.tokens:
                clock["ttft"] = time.perf_counter() - start
            stats.tokens += 1
            yield token
    finally:
        torch.set_num_threads(before)
        timed(clock, "decode", t0)
        tokens.close()
        if store.enabled:
            keep(store, cache, prompt.positions + tuple(fed))
        stats.cache.update(caches.stats())
