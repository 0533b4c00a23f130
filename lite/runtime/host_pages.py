"""On a CPU without paging, the checkpoint pages of the components a phase does not use leave the RSS.

Weights kept in their stored dtype stay views of the memory-mapped shards. Once touched, their pages count
in the process's RSS until the mapping goes, so a t2i run held the LLM and the ViT (read while the
conditions were built) all through denoising and decoding, and the Yak through decoding. At each phase
change this drops the pages of every unit the new phase does not use (`lite.memory.release_file_pages`):
the data stays in the file and in the page cache, and comes back by a page fault (from the cache, or the
disk when memory was short) when a later phase reads it. Which unit runs in which phase is the planner's
own table (`lite.model.memory_profile.unit_specs`), so the plan and the run count the same pages.
"""

from __future__ import annotations

import torch
from torch import nn

from offload.units import Unit

from lite.memory import release_file_pages, tensor_span
from lite.model.memory_profile import Workload, ovis_units


class PhasePageRelease:
    """A pipeline phase listener: `listener(phase)` releases what that phase does not use."""

    def __init__(self, model: nn.Module) -> None:
        """Built on the loaded model before anything repacks its weights (units read tensor addresses)."""
        # A generation workload: the widest phase sets (the refiner also runs while conditions are built).
        self.units: list[Unit] = ovis_units(model, Workload("t2i", device_type="cpu"))
        self.phase: str | None = None
        self.released_bytes = 0

    def __call__(self, phase: str) -> None:
        if phase == self.phase:
            return
        self.phase = phase
        spans = [tensor_span(t) for u in self.units if phase not in u.phases for slot in u.slots
                 if (t := slot.get()) is not None and t.device.type == "cpu" and t.layout == torch.strided]
        self.released_bytes += release_file_pages(spans)
