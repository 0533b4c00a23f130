"""argparse `type=` functions: every number and name is checked while parsing, before anything loads.

Nothing here imports torch or the model: a bad argument is one line in well under a second.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Any

from offload.errors import UserError

from lite.runtime.engine_choice import parse_engine  # light: no torch
from lite.validation import parse_bytes

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes any int64 >= 0; noise for seed+i stays in range
DEVICE_RE = re.compile(r"(auto|cpu|mps|cuda)(:[0-9]+)?")


def finite_float(low: float | None = None, high: float | None = None, low_open: bool = False):
    """A float that is finite and inside [low, high] (or (low, high] with `low_open`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if low_open else '>='} {low:g}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} must be <= {high:g}")
        return value

    parse.__name__ = "number"
    return parse


def bounded_int(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{text} must be an integer {bound}")
        return value

    parse.__name__ = "int"
    return parse


def seed(text: str) -> int | str:
    """An integer in [0, 2**63 - 1], or `random` / -1 (sd.cpp's spelling; drawn at run time and recorded)."""
    if text.strip().lower() in ("random", "-1"):
        return "random"
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: give an integer or `random`") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seed {text} is out of range: use 0 .. {MAX_SEED}, or `random` / -1")
    return value


def size(text: str) -> int:
    """'4GB', '512MB', '100B' (lite.validation.parse_bytes): a bare number is refused as ambiguous."""
    try:
        return parse_bytes(text)
    except (UserError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def llm_engine(text: str) -> Any:
    """`torch`, `llama.cpp` or `llama.cpp:FORMAT` (`lite.runtime.engine_choice`)."""
    try:
        return parse_engine(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def device(text: str) -> str:
    if not DEVICE_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda, cuda:N or mps")
    return text


def text(value: str) -> str:
    """A prompt as the user typed it; bytes that are not UTF-8 (argv surrogates) are refused."""
    problem = utf8_problem("the text", value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def utf8_problem(name: str, value: str) -> str | None:
    """Why `value` (decoded from argv or a file with surrogateescape) is not UTF-8, or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"{name} holds bytes that are not valid UTF-8 (at character {exc.start}); re-encode it as UTF-8"
    return None
