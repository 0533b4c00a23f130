"""Argument checks shared by the Python API and the CLI (no torch import: they run first).

Every check names the argument, shows the value and says what is allowed. A value of the wrong
*type* raises `ArgumentTypeError` (an `InputError` and a `TypeError`); a value of the right type
out of range raises `InputError` (a `ValueError`). Both are `UserError`s: one line, exit code 2.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence

from lite.errors import ArgumentTypeError, InputError

MIN_SIDE, MAX_SIDE = 16, 4096
#: Seeds are what `torch.Generator.manual_seed` takes without overflow: 0 <= seed < 2**63.
SEED_LIMIT = 1 << 63
#: The largest size `parse_bytes` accepts (8 EiB - 1, an int64).
MAX_BYTES = (1 << 63) - 1


def shown(value: object, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters so a message stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: object) -> str:
    return type(value).__name__


def check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """An integer (bool refused) with `low <= value <= high`; returns it as a plain int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an integer, got {shown(value)} ({_type_name(value)})")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            bound = f"between {low} and {high}"
        else:
            bound = f">= {low}" if low is not None else f"<= {high}"
        raise InputError(f"{name} must be an integer {bound}, got {shown(value)}")
    return value


def check_positive_int(name: str, value: object, low: int = 1, high: int | None = None) -> None:
    """An integer in [low, high] (kept for its callers; `check_int` returns the value)."""
    check_int(name, value, low, high)


def check_finite(name: str, value: object, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """A real, finite number (bool, NaN and +-inf refused) in [low, high] (or (low, high] with `low_open`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a number, got {shown(value)} ({_type_name(value)})")
    number = float(value)
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {shown(value)}")
    below = low is not None and (number <= low if low_open else number < low)
    if below or (high is not None and number > high):
        left = "" if low is None else (f"> {low:g}" if low_open else f">= {low:g}")
        right = "" if high is None else f"<= {high:g}"
        raise InputError(f"{name} must be a number {' and '.join(p for p in (left, right) if p)}, got {shown(value)}")
    return number


def check_cfg(name: str, value: object) -> float:
    """A guidance scale: finite and >= 0 (inf gives a black image, NaN a NaN image)."""
    return check_finite(name, value, low=0.0)


def check_probability(name: str, value: object) -> float:
    """A probability in (0, 1], such as `top_p` (0 would keep no token)."""
    return check_finite(name, value, low=0.0, high=1.0, low_open=True)


#: The smallest sampling temperature: below it logits/temperature overflows to inf and sampling fails
#: (5e-324 did); such a temperature is greedy decoding in all but name.
MIN_TEMPERATURE = 1e-3


def check_temperature(value: object, name: str = "temperature") -> float:
    """A sampling temperature: finite and >= MIN_TEMPERATURE (greedy decoding is `do_sample=False`, not 0)."""
    number = check_finite(name, value, low=0.0, low_open=True)
    if number < MIN_TEMPERATURE:
        raise InputError(f"{name} must be >= {MIN_TEMPERATURE:g} (a smaller one overflows the logits), got "
                         f"{shown(value)}; for greedy decoding, do not sample")
    return number


def check_seed(value: object, name: str = "seed", allow_none: bool = True) -> int | None:
    """A seed: an integer 0 <= seed < 2**63 (what torch's generators take), or None for a random one."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        what = "an integer 0 <= seed < 2**63" + (" or None" if allow_none else "")
        raise ArgumentTypeError(f"{name} must be {what}, got {shown(value)} ({_type_name(value)})")
    value = int(value)
    if not 0 <= value < SEED_LIMIT:
        raise InputError(f"{name} must be an integer 0 <= seed < 2**63, got {shown(value)}")
    return value


def check_interval(name: str, value: object, allow_none: bool = True) -> tuple[float, float] | None:
    """Two numbers 0 <= lo <= hi <= 1 (a CFG interval in flow time), or None for "everywhere"."""
    if value is None and allow_none:
        return None
    allowed = "two numbers 0 <= lo <= hi <= 1, such as (0.1, 1.0)" + (", or None" if allow_none else "")
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ArgumentTypeError(f"{name} must be {allowed}, got {shown(value)} ({_type_name(value)})")
    if len(value) != 2:
        raise InputError(f"{name} must be {allowed}, got {len(value)} value(s): {shown(value)}")
    lo = check_finite(f"{name}[0]", value[0], 0.0, 1.0)
    hi = check_finite(f"{name}[1]", value[1], 0.0, 1.0)
    if lo > hi:
        raise InputError(f"{name} must be {allowed}, got lo {lo:g} > hi {hi:g}")
    return lo, hi


def check_text(name: str, text: object) -> str:
    """A non-empty string (a number or None is a type error, not "empty")."""
    if not isinstance(text, str):
        raise ArgumentTypeError(f"{name} must be a string, got {shown(text)} ({_type_name(text)})")
    if not text.strip():
        raise InputError(f"{name} is empty; give a non-empty {name}")
    check_encodable(name, text)
    return text


def check_encodable(name: str, text: str) -> str:
    """Text that is valid Unicode: a lone surrogate (half a UTF-16 pair, e.g. from JSON "\\ud800" or an
    undecodable command-line byte) cannot be tokenized, written to metadata or sent back as JSON."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{name} holds an invalid character (a lone surrogate, {shown(text[exc.start])}, at "
                         f"position {exc.start}); send valid UTF-8 text") from None
    return text


def check_side(name: str, value: object) -> None:
    """An image side in pixels, MIN_SIDE..MAX_SIDE."""
    check_int(name, value, MIN_SIDE, MAX_SIDE)


def check_steps(value: object, name: str = "steps", high: int = 1000) -> int:
    return check_int(name, value, 1, high)


def check_max_new_tokens(value: object, limit: int, name: str = "max_new_tokens") -> int:
    """1 <= value <= limit, where `limit` is what the model's context leaves after the prompt window."""
    if limit < 1:
        raise InputError(f"{name}: the model's context leaves no room for new tokens (limit {limit})")
    return check_int(name, value, 1, limit)


_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KMGT]?)(i?B)?\s*", re.IGNORECASE)
_SCALES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: object, name: str = "size") -> int:
    """'6GB', '6 GiB', '512MB', '2.5G', '100B' -> bytes.

    Every unit is binary, whichever way it is spelt: K/KB/KiB = 2**10, M/MB/MiB = 2**20,
    G/GB/GiB = 2**30, T/TB/TiB = 2**40, B = 1 (so `6GB` is the 6 GiB budget the README and the
    presets mean). A bare number has no unit and is refused as ambiguous (is `8` 8 bytes or 8 GB?):
    write `8GB`, or `8B` for bytes. Zero, negatives, exponents and sizes past 2**63 are refused.
    """
    if not isinstance(text, str):
        raise ArgumentTypeError(f"{name} must be a size string such as 6GB, got {shown(text)} ({_type_name(text)})")
    m = _SIZE.fullmatch(text)
    if not m:
        raise InputError(f"cannot read {name} {shown(text)} as a size; write it like 6GB, 512MB or 100B")
    number, prefix, unit = m.group(1), m.group(2).upper(), m.group(3)
    if not prefix and unit is None:
        raise InputError(f"{name} {shown(text)} has no unit: write {number}GB for gigabytes (2**30 bytes) "
                         f"or {number}B for bytes")
    if unit is not None and unit.lower() == "ib" and not prefix:
        raise InputError(f"cannot read {name} {shown(text)} as a size; write it like 6GB, 512MB or 100B")
    value = float(number) * _SCALES[prefix]
    if not 1 <= value <= MAX_BYTES:
        raise InputError(f"{name} {shown(text)} must be between 1 byte and 8 EiB")
    return int(value)
