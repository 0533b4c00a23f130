"""Resolve once what loading needs, and hand the objects down: `ResolvedRun`.

The CLI builds one from its own resolution (device fallback notices, the preset the planner chose, the
budget capped by the free memory); `OvisPipeline.from_pretrained` builds one with `resolve`. Either way
`OvisPipeline.load` takes it as it is: nothing below looks the checkpoint up, reads its configs, or parses a
device, dtype or preset name again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lite.model.checkpoint import CheckpointKind, checkpoint_kind, find_checkpoint
from lite.model.config import OvisU1Config, PreprocessorConfig
from lite.model.preflight import check_checkpoint_files
from lite.runtime.devices import resolve_device, resolve_dtype
from lite.runtime.engine_choice import EngineChoice, check_engine, check_engine_source, parse_engine
from lite.runtime.presets import Preset, get_preset


@dataclass
class ResolvedRun:
    """One resolved value per setting of a load (the CLI's `RunConfig` extends it with what it reports)."""

    directory: Path
    config: OvisU1Config
    preprocessor: PreprocessorConfig
    device: torch.device
    dtype: torch.dtype | None  # None: the preset's formats (bf16 without a preset; the CPU's compute choice)
    preset: Preset | None
    budget_bytes: int | None  # the paging budget asked for; None: the preset's
    kind: CheckpointKind  # plain, or written by `ovis-lite quantize` (its own formats win): decided once
    vae_dtype: torch.dtype = torch.float32
    progress: bool = True
    llm_engine: EngineChoice = EngineChoice()  # what runs understanding's LLM (checked: `check_engine`)


def read_checkpoint(path: str | Path | None) -> tuple[Path, OvisU1Config, PreprocessorConfig, CheckpointKind]:
    """(directory, model config, preprocessor config, kind), each read once, after every file check that needs
    no weight (`lite.model.preflight`: configs, tokenizer files, shard headers)."""
    directory = find_checkpoint(path)
    kind = checkpoint_kind(directory)
    config, pp = check_checkpoint_files(directory, kind)
    return directory, config, pp, kind


def resolve(path: str | Path | None = None, device: str | torch.device = "auto",
            dtype: str | torch.dtype | None = "auto", vae_dtype: torch.dtype = torch.float32,
            preset: str | Preset | None = None, budget_bytes: int | None = None,
            progress: bool = True, llm_engine: str | EngineChoice = "torch") -> ResolvedRun:
    """The Python API's resolution: an accelerator asked for by name must exist (no silent CPU fallback)."""
    chosen = get_preset(preset) if preset is not None else None
    dev, _ = resolve_device(device, strict=True)
    engine = llm_engine if isinstance(llm_engine, EngineChoice) else parse_engine(llm_engine)
    check_engine(engine, dev)
    compute = None if dtype in (None, "auto") else resolve_dtype(dtype)
    directory, config, pp, kind = read_checkpoint(path)
    check_engine_source(engine, directory, kind is CheckpointKind.PREQUANTIZED)
    return ResolvedRun(directory, config, pp, dev, compute, chosen, budget_bytes, kind, vae_dtype, progress, engine)
