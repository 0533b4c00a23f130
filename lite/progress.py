"""The one progress bar of the runtime: tqdm on stderr, off when asked or when stderr is not a terminal
(so logs get no carriage-return frames)."""

from __future__ import annotations

from tqdm import tqdm


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "it") -> tqdm:
    # disable=None is tqdm's "off unless stderr is a TTY".
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=None if enabled else True)
