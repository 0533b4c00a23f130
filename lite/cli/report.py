"""What the CLI tells the user: notices and summaries on stderr, results as JSON on stdout."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def say(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def notice(args: argparse.Namespace, message: str) -> None:
    say(args, f"ovis-lite: {message}")


def summary(args: argparse.Namespace, stats: Any, output: str | None, extra: str = "") -> None:
    # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
    from lite.memory import format_bytes

    dev = f", device peak {format_bytes(stats.peak_device_bytes)}" if stats.peak_device_bytes is not None else ""
    size = f" {stats.width}x{stats.height}" if stats.width else ""
    counts = f", {stats.counts()}" if stats.counts() else ""
    dest = f" -> {output}" if output else ""
    host = (f" (run: anonymous {format_bytes(stats.peak_anon_bytes)}, mapped {format_bytes(stats.peak_mapped_bytes)})"
            if stats.peak_anon_bytes else "")
    say(args, f"ovis-lite: {stats.task}{size}{counts} in {stats.seconds:.1f} s, host peak "
              f"{format_bytes(stats.peak_rss_bytes)}{host}{dev}{extra}{dest}")


def load_report_cpu(pipe: Any) -> list[str]:
    """The CPU plan block of the load report (llama.cpp style: one choice a line, with its reason); [] off CPU."""
    plan = getattr(pipe, "cpu_plan", None)
    if plan is None:
        return []
    hooks = getattr(pipe, "cpu_hooks", None)
    return [f"ovis-lite: {line}" for line in plan.describe(hooks.packed_layers if hooks is not None else None)]


def _machine_and_plan(stats: Any) -> dict[str, Any]:
    """`machine` and `cpu_plan` (an object of its own, null off CPU) for the --json results."""
    machine = dict(stats.machine or {})
    return {"machine": machine, "cpu_plan": machine.pop("cpu_plan", None)}


def image_result(stats: Any, output: str, seed: int, preset: str) -> str:
    """One line of `generate/edit --json`."""
    return json.dumps({"task": stats.task, "output": output, "seed": seed, "preset": preset,
                       "seconds": round(stats.seconds, 3), "steps": stats.steps, "nfe": stats.nfe,
                       "width": stats.width, "height": stats.height, "peak_rss_bytes": stats.peak_rss_bytes,
                       "peak_anon_bytes": stats.peak_anon_bytes, "peak_mapped_bytes": stats.peak_mapped_bytes,
                       "peak_device_bytes": stats.peak_device_bytes, "settings": stats.settings,
                       "phases": stats.to_dict()["phases"], "cache": stats.cache, **_machine_and_plan(stats)})


def answer_result(stats: Any, answer: str, tokens: int, preset: str, seed: int | None) -> str:
    """One line of `ask --json`: the answer, its token count and speed (no image fields)."""
    seconds = stats.seconds
    return json.dumps({"task": "understand", "answer": answer, "tokens": tokens,
                       "tokens_per_second": round(tokens / seconds, 3) if seconds > 0 else None,
                       "seconds": round(seconds, 3), "preset": preset, "seed": seed,
                       "peak_rss_bytes": stats.peak_rss_bytes, "peak_device_bytes": stats.peak_device_bytes,
                       "phases": stats.to_dict()["phases"], "cache": stats.cache, **_machine_and_plan(stats)})


def count_tokens(stats: Any, tokenizer: Any, answer: str) -> int:
    """Tokens generated: the runtime's count when it kept one, else the answer re-tokenized."""
    value = getattr(stats, "tokens", None)
    if isinstance(value, int) and value > 0:
        return value
    return len(tokenizer(answer, add_special_tokens=False)["input_ids"]) if answer else 0


def user_error_line(exc: BaseException) -> str:
    """The one line a user error prints: its message's first line (its class name if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
