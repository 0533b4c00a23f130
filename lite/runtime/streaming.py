"""Streaming an LLM answer token by token from a worker thread, and stopping it cleanly.

transformers' `generate` blocks, so it runs in a thread that feeds a `TextIteratorStreamer`. A consumer
that stops early (a closed pipe, Ctrl-C, a disconnected client) sets a flag that a stopping criterion
reads at the next token, and the worker is joined: no thread is left running at interpreter exit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer


class _StopWhenSet(StoppingCriteria):
    def __init__(self, stop: threading.Event, stats: Any) -> None:
        self.stop, self.stats = stop, stats

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
        self.stats.tokens = int(input_ids.shape[-1])
        return torch.full((input_ids.shape[0],), self.stop.is_set(), dtype=torch.bool, device=input_ids.device)


class DecodeThreads(StoppingCriteria):
    """On a CPU, decode with the thread count that measured fastest (`hardware.decode_thread_count`: a
    memory-bound GEMV often runs faster on one thread than on two that spin), but leave the prompt's
    compute-bound forward on all of them. transformers calls a stopping criterion first right after the
    prompt's forward, which is where the switch happens; `restore` puts the count back."""

    def __init__(self) -> None:
        self.before: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
        if self.before is None:
            from lite.runtime.hardware import decode_thread_count

            self.before = torch.get_num_threads()
            torch.set_num_threads(decode_thread_count())
        return torch.zeros((input_ids.shape[0],), dtype=torch.bool, device=input_ids.device)

    def restore(self) -> None:
        if self.before is not None:
            torch.set_num_threads(self.before)
            self.before = None


def generate_on(llm: Any, kwargs: dict[str, Any], criteria: list[StoppingCriteria], device: torch.device) -> Any:
    """`llm.generate(**kwargs)` with `criteria`, and the decode thread policy on a CPU."""
    threads = DecodeThreads() if device.type == "cpu" else None
    try:
        with torch.no_grad():
            return llm.generate(**kwargs, stopping_criteria=StoppingCriteriaList(criteria + ([threads] if threads else [])))
    finally:
        if threads is not None:
            threads.restore()


def stream_tokens(llm: Any, tokenizer: Any, kwargs: dict[str, Any], stats: Any) -> Iterator[str]:
    """Text pieces of `llm.generate(**kwargs)` as they are decoded; `stats.tokens` counts generated tokens."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    error: list[BaseException] = []
    stop = threading.Event()

    def run() -> None:
        try:
            generate_on(llm, {**kwargs, "streamer": streamer}, [_StopWhenSet(stop, stats)], llm.device)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            error.append(exc)
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        yield from streamer
    finally:
        stop.set()
        worker.join()
    if error:
        raise error[0]
