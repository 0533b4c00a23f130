"""Reading JSON config files someone else wrote, with typed, range-checked access to their fields.

Every getter's error is one `ConfigError` line naming the file and the dotted key (e.g.
`config.json: key 'llm_config.num_hidden_layers' must be an integer, got 'x'`), so that code
reading a config through `Section` can never meet a value of the wrong type or range later.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from lite.errors import ConfigError

#: A config file is a few kB; anything far larger is not one (and is not read into memory).
MAX_CONFIG_BYTES = 16 << 20


# ---------------------------------------------------------------------------------------------
# Reading a JSON file that someone else wrote.
# ---------------------------------------------------------------------------------------------

def read_json_file(path: Path, error: type[Exception] = ConfigError, what: str = "config file") -> Any:
    """The parsed JSON of a regular, readable, UTF-8 file, or one `error` line naming the file.

    A directory, a FIFO (which would block), a device, an unreadable or non-UTF-8 file, bad JSON
    and absurd nesting are all refused with the reason.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"no {what} at {path}") from None
    except PermissionError:
        raise error(f"{what} {path} is not readable (permission denied)") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or type(exc).__name__}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is not a regular file (a FIFO, socket or device)")
    if st.st_size > MAX_CONFIG_BYTES:
        raise error(f"{what} {path} is {st.st_size} bytes, over the {MAX_CONFIG_BYTES >> 20} MiB a config can be")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise error(f"{what} {path} is not a regular file")
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except PermissionError:
        raise error(f"{what} {path} is not readable (permission denied)") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or type(exc).__name__}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise error(f"{path} is nested too deeply to be a {what}") from None


# ---------------------------------------------------------------------------------------------
# Typed access: every field the code uses is checked here, so no later code meets a bad value.
# ---------------------------------------------------------------------------------------------

_MISSING = object()


class Section:
    """One JSON object of a config file, with typed getters whose errors name the file and the key."""

    def __init__(self, data: object, source: str, prefix: str) -> None:
        if not isinstance(data, dict):
            where = f"key {prefix!r}" if prefix else "the top level"
            raise ConfigError(f"{source}: {where} must be a JSON object, got {shown(data)}")
        self.data, self.source, self.prefix = data, source, prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, what: str, value: object) -> ConfigError:
        return ConfigError(f"{self.source}: key {self.key(name)!r} must be {what}, got {shown(value)}")

    def raw(self, name: str, default: object = _MISSING) -> object:
        if name in self.data:
            return self.data[name]
        if default is _MISSING:
            raise ConfigError(f"{self.source}: key {self.key(name)!r} is missing: this is not an Ovis-U1 config")
        return default

    def section(self, name: str, optional: bool = False) -> Section:
        value = self.raw(name, None if optional else _MISSING)
        return Section({} if value is None and optional else value, self.source, self.key(name))

    def int(self, name: str, default: object = _MISSING, low: int | None = 1, high: int | None = None,
            nullable: bool = False) -> Any:
        value = self.raw(name, default)
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, "an integer" + (" or null" if nullable else ""), value)
        if (low is not None and value < low) or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None and low is not None else (
                f">= {low}" if low is not None else f"<= {high}")
            raise self.fail(name, f"an integer {bound}", value)
        return value

    def float(self, name: str, default: object = _MISSING, low: float | None = None, high: float | None = None,
              positive: bool = False) -> float:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(name, "a finite number", value)
        if (positive and value <= 0) or (low is not None and value < low) or (high is not None and value > high):
            parts = (["> 0"] if positive else []) + ([f">= {low:g}"] if low is not None else []) + (
                [f"<= {high:g}"] if high is not None else [])
            raise self.fail(name, "a number " + " and ".join(parts), value)
        return float(value)

    def bool(self, name: str, default: object = _MISSING) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise self.fail(name, "true or false", value)
        return value

    def str(self, name: str, default: object = _MISSING, choices: tuple[str, ...] | None = None) -> str:
        value = self.raw(name, default)
        if not isinstance(value, str) or (choices is not None and value not in choices):
            raise self.fail(name, f"one of {', '.join(map(repr, choices))}" if choices else "a string", value)
        return value

    def int_list(self, name: str, default: object = _MISSING, length: int | None = None, low: int = 1) -> tuple[int, ...]:
        value = self.raw(name, default)
        what = f"a list of {length or 'one or more'} integers >= {low}"
        if not isinstance(value, (list, tuple)) or not value or (length is not None and len(value) != length) or any(
                isinstance(v, bool) or not isinstance(v, int) or v < low for v in value):
            raise self.fail(name, what, value)
        return tuple(value)

    def float_list(self, name: str, default: object = _MISSING, length: int = 3, positive: bool = False) -> tuple[float, ...]:
        value = self.raw(name, default)
        what = f"a list of {length} finite numbers" + (" > 0" if positive else "")
        if not isinstance(value, (list, tuple)) or len(value) != length or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                or (positive and v <= 0) for v in value):
            raise self.fail(name, what, value)
        return tuple(float(v) for v in value)

    def str_list(self, name: str, length: int) -> tuple[str, ...]:
        value = self.raw(name)
        if not isinstance(value, list) or len(value) != length or not all(isinstance(v, str) for v in value):
            raise self.fail(name, f"a list of {length} strings", value)
        return tuple(value)


def shown(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'list'}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def divides(section: Section, a: str, va: int, b: str, vb: int) -> None:
    if va % vb:
        raise ConfigError(f"{section.source}: key {section.key(a)!r} ({va}) must be a multiple of "
                          f"{section.key(b)!r} ({vb})")
