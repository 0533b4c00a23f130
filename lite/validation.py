"""Argument checks shared by the Python API and the CLI (no torch import: they run first)."""

from __future__ import annotations

from lite.errors import InputError

MIN_SIDE, MAX_SIDE = 16, 4096


def check_positive_int(name: str, value: object, low: int = 1, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise InputError(f"{name} must be an integer {bound}, got {value!r}")


def check_cfg(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise InputError(f"{name} must be a number >= 0, got {value!r}")


def check_text(name: str, text: object) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{name} is empty; give a non-empty {name}")
    return text


def check_side(name: str, value: object) -> None:
    check_positive_int(name, value, MIN_SIDE, MAX_SIDE)
