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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from lite.model.processing import preprocess_image, tokenize_with_images, truncate_left
from lite.runtime.decode import Sampling, TextPieces, forward_last, timed, tokens_from
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
    clock: dict[str, float] = stats.phases
    with torch.no_grad():
        prompt = build_prompt(pipe, text, images, clock)
    window = CoreWindow.start() if pipe.device.type == "cpu" else None
    t0 = time.perf_counter()
    engine = getattr(pipe, "llm_engine", None)
    run = (LlamaCppRun(engine, model, caches, prompt, max_new_tokens) if engine is not None
           else TorchRun(model.llm, caches, prompt, max_new_tokens))
    with torch.no_grad():
        logits = run.prefill()
    timed(clock, "prefill", t0)
    stats.cache = {"prefix_tokens_reused": run.reused, "prefill_tokens": len(prompt.positions) - run.reused}
    threads = None
    if window is not None:
        threads, reason = window.decode_threads(torch.get_num_threads(), spinning=engine is not None)
        stats.settings["decode_threads"] = threads
        stats.settings["decode_threads_reason"] = reason
    fed: list[int] = []
    tokens = tokens_from(logits, sampling, max_new_tokens, model.config.eos_token_id, run.feed_for(threads), fed)
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
        run.keep(prompt.positions + tuple(fed))
        stats.cache.update(caches.stats())
        stats.cache.update(run.extra_stats())


class TorchRun:
    """The prompt through our LLM over a KV cache that starts from the longest kept snapshot's prefix."""

    def __init__(self, llm: Any, caches: Any, prompt: Prompt, max_new_tokens: int) -> None:
        self.llm, self.store, self.prompt = llm, caches.prefix_kv, prompt
        prefix, shared = longest_prefix(self.store, prompt.positions)
        self.reused = min(shared, len(prompt.positions) - 1)  # the last position always runs: it picks token 1
        self.store.count("reused_tokens", self.reused)
        self.store.count("prefilled_tokens", len(prompt.positions) - self.reused)
        self.cache = new_cache(llm.config.num_hidden_layers, len(prompt.positions) + max_new_tokens, prefix,
                               self.reused)

    def prefill(self) -> torch.Tensor:
        return forward_last(self.llm, self.cache, inputs_embeds=self.prompt.embeds[:, self.reused:])

    def feed_for(self, threads: int | None) -> Callable[[int], torch.Tensor]:
        return lambda token: forward_last(self.llm, self.cache, token=token)

    def keep(self, positions: PositionKey) -> None:
        if self.store.enabled:
            keep(self.store, self.cache, positions)

    def extra_stats(self) -> dict[str, Any]:
        return {}


class LlamaCppRun:
    """The prompt through llama.cpp (`lite.runtime.llama_engine`): its one-sequence KV keeps the longest
    common prefix when the prefix cache is on, and nothing between calls when it is off."""

    def __init__(self, engine: Any, model: Any, caches: Any, prompt: Prompt, max_new_tokens: int) -> None:
        self.engine, self.store, self.prompt, self.room = engine, caches.prefix_kv, prompt, max_new_tokens
        self.embed = model.llm.get_input_embeddings()
        self.reused = 0

    def prefill(self) -> torch.Tensor:
        positions = self.prompt.positions
        limit = len(positions) - 1 if self.store.enabled else 0
        self.engine.set_threads(torch.get_num_threads(), torch.get_num_threads())
        logits, self.reused = self.engine.prefill(self.prompt.embeds, positions, limit, self.room)
        self.store.count("reused_tokens", self.reused)
        self.store.count("prefilled_tokens", len(positions) - self.reused)
        return logits

    def feed_for(self, threads: int | None) -> Callable[[int], torch.Tensor]:
        if threads is not None:
            self.engine.set_threads(threads, torch.get_num_threads())
        device = self.prompt.embeds.device
        return lambda token: self.engine.step(self.embed(torch.tensor([token], device=device))[0], token)

    def keep(self, positions: PositionKey) -> None:
        if not self.store.enabled:
            self.engine.forget()

    def extra_stats(self) -> dict[str, Any]:
        return {"llm_engine": f"llama.cpp:{self.engine.gguf_format}", "llama_kv_bytes": self.engine.kv_bytes()}
