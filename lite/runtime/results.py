"""What `generate`, `edit` and `understand` return: values that carry their output and what the run cost.

Modelled on diffusers' pipeline outputs and mflux's `GeneratedImage`: `ImageResult` holds the images, their
seeds, the run's `RunStats` and writes an image with its metadata; `AnswerResult` holds an answer; an
`AnswerStream` is iterated for the answer's pieces and holds the same result once the source is exhausted.

Counts are defined here and nowhere else: a *step* is one solver step (what the denoise bar counts), the
*NFE* is the number of Yak (MMDiT) evaluations one image took (a step runs one pass per active guidance
branch, and a second-order solver evaluates twice per step). Both are per image; `nfe_total` is the sum over
the images of a call. `RunStats.counts()` is the one way they are shown.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from lite.runtime.metadata import image_metadata
from lite.runtime.outputs import save_image


@dataclass
class RunStats:
    """What one call cost: phases (seconds), counts, size, peaks, the settings it ran with."""

    task: str
    seconds: float = 0.0
    steps: int = 0  # solver steps per image: what the denoise bar counts
    nfe: int = 0  # Yak evaluations per image
    nfe_total: int = 0  # Yak evaluations of the whole call (all its images)
    images: int = 0  # images made (a cancelled call counts the one it stopped in)
    width: int = 0
    height: int = 0
    peak_device_bytes: int | None = None
    peak_rss_bytes: int = 0  # the process's high-water mark (VmHWM): the load's peak included
    peak_anon_bytes: int = 0  # during the run: anonymous (heap, converted weights, activations) ...
    peak_mapped_bytes: int = 0  # ... and file-backed (checkpoint pages a phase reads, libraries)
    tokens: int = 0  # understanding: generated tokens
    machine: dict[str, Any] = field(default_factory=dict)  # on a CPU: its instruction sets and cores
    phases: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # prefix tokens reused (understanding), the caches' stats

    def add_phase(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    def counts(self) -> str:
        """Steps and NFE as every surface shows them: "8 steps, NFE 16 per image" (plus the image count)."""
        if not self.steps:
            return ""
        many = f", {self.images} images" if self.images > 1 else ""
        return f"{self.steps} steps, NFE {self.nfe} per image{many}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the CLI's `--json`, the server's `stats` and `/metrics` read this."""
        out = asdict(self)
        out["seconds"] = round(self.seconds, 4)
        out["phases"] = {name: round(value, 4) for name, value in self.phases.items()}
        return out


@dataclass
class ImageResult:
    """The images of one `generate`/`edit` call, in seed order, with what it cost.

    `cancelled` is True when the step callback returned False: the image it stopped in is the latent
    decoded as it stood (later images of the call were not started).
    """

    images: list[Image.Image]
    seeds: list[int]
    stats: RunStats
    model_id: str = ""
    preset: str | None = None
    cancelled: bool = False

    @property
    def image(self) -> Image.Image:
        """The first (or only) image."""
        return self.images[0]

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[Image.Image]:
        return iter(self.images)

    def metadata(self, index: int = 0) -> dict[str, Any]:
        """What the file of image `index` records (the CLI's and the server's fields): settings, its seed."""
        meta = image_metadata(self.model_id, self.stats, self.stats.task, self.preset, self.seeds[index])
        if self.cancelled:
            meta["cancelled"] = True
        return meta

    def save(self, path: str | os.PathLike[str], overwrite: bool = False, index: int = 0) -> Path:
        """Write image `index` atomically with its metadata (never over an existing file unless `overwrite`)."""
        return save_image(self.images[index], path, overwrite, self.metadata(index))


@dataclass
class AnswerResult:
    """An answer to `understand`: `str(result)` is its text."""

    text: str
    stats: RunStats

    def __str__(self) -> str:
        return self.text


class AnswerStream:
    """A streamed answer: iterate it for the text pieces as they are decoded; once the source is exhausted,
    `done` is True and `text`, `stats` (phases included) and `result` hold the whole answer.

    The token source is any iterator of text pieces; `finish` completes the stats once it ends. Closing the
    stream early (a closed pipe, a cancelled job) closes the source, and `done` stays False.
    """

    def __init__(self, pieces: Iterator[str], stats: RunStats, finish: Callable[[RunStats], object]) -> None:
        self._pieces = pieces
        self._parts: list[str] = []
        self._finish = finish
        self.stats = stats
        self.done = False

    def __iter__(self) -> AnswerStream:
        return self

    def __next__(self) -> str:
        try:
            piece = next(self._pieces)
        except StopIteration:
            if not self.done:
                self.done = True
                self._finish(self.stats)
            raise
        self._parts.append(piece)
        return piece

    def close(self) -> None:
        """Stop the source (its worker is joined); the pieces read so far stay in `text`."""
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()

    @property
    def text(self) -> str:
        return "".join(self._parts)

    @property
    def result(self) -> AnswerResult:
        """The whole answer, reading what is left of the stream first."""
        for _ in self:
            pass
        return AnswerResult(self.text, self.stats)

    def __str__(self) -> str:
        return self.result.text
