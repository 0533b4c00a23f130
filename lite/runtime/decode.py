"""Token generation over the LLM with a preallocated KV cache: prefill, then one token per step.

transformers' `generate` spends per token on logits processors, stopping criteria, streamers and
cache bookkeeping; this loop does only what an answer needs. Its choices are `generate`'s: greedy
is the argmax of the float32 logits of the last position, sampling applies the same warpers
(transformers' `TemperatureLogitsWarper` then `TopPLogitsWarper`, top_k off) and draws with
`torch.multinomial` from a generator seeded like `torch.manual_seed(seed)`; so greedy answers are
token-identical to `generate`'s and sampled ones have its semantics (and, seed for seed, its draws).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TextStreamer
from transformers.cache_utils import Cache
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper


@dataclass
class Sampling:
    """Greedy, or sampling with `temperature` and nucleus `top_p`, seeded."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 42
    _generator: torch.Generator | None = field(default=None, repr=False)

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from [1, V] float32 logits."""
        if not self.do_sample:
            return int(torch.argmax(logits, dim=-1))
        scores = logits
        if self.temperature != 1.0:
            scores = TemperatureLogitsWarper(self.temperature)(None, scores)
        if self.top_p < 1.0:
            scores = TopPLogitsWarper(self.top_p)(None, scores)
        if self._generator is None or self._generator.device != scores.device:
            self._generator = torch.Generator(scores.device).manual_seed(self.seed)
        probs = torch.nn.functional.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self._generator))


def forward_last(llm: Any, cache: Cache, inputs_embeds: torch.Tensor | None = None,
                 token: int | None = None) -> torch.Tensor:
    """The float32 logits of the last position after feeding `inputs_embeds` [1, n, H] or one `token`."""
    if token is not None:
        ids = torch.tensor([[token]], dtype=torch.long, device=cache.layers[0].keys.device)
        out = llm(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    else:
        out = llm(inputs_embeds=inputs_embeds, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].to(dtype=torch.float32)


def generate_tokens(llm: Any, cache: Cache, first_logits: torch.Tensor, sampling: Sampling, max_new_tokens: int,
                    eos_token_id: int, fed: list[int]) -> Iterator[int]:
    """`tokens_from` over our LLM and its KV `cache` (`forward_last`)."""
    return tokens_from(first_logits, sampling, max_new_tokens, eos_token_id,
                       lambda token: forward_last(llm, cache, token=token), fed)


def tokens_from(first_logits: torch.Tensor, sampling: Sampling, max_new_tokens: int, eos_token_id: int,
                feed: Callable[[int], torch.Tensor], fed: list[int]) -> Iterator[int]:
    """Token ids, first from `first_logits` (the prompt's last position), until `eos_token_id` (yielded) or
    `max_new_tokens`. `feed(token)` runs one token through the LLM and gives the next logits [1, V] (the torch
    path: `forward_last` over a KV cache; or `lite.runtime.llama_engine`); every token fed is appended to `fed`
    (the last one never is)."""
    logits = first_logits
    for step in range(max_new_tokens):
        token = sampling.choose(logits)
        yield token
        if token == eos_token_id or step + 1 == max_new_tokens:
            return
        logits = feed(token)
        fed.append(token)


class TextPieces(TextStreamer):
    """transformers' incremental detokenizer (whole words, no split UTF-8), collecting instead of printing."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.pieces: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.pieces.append(text)

    def feed(self, token: int | None) -> list[str]:
        """The text a new token completes (`None`: the end, flush the rest)."""
        if token is None:
            self.end()
        else:
            self.put(torch.tensor([token]))
        out, self.pieces = self.pieces, []
        return out


def timed(clock: dict[str, float], name: str, start: float) -> None:
    clock[name] = clock.get(name, 0.0) + time.perf_counter() - start
