"""Resolve once what a run needs (checkpoint, device, dtype, preset, budget) and load the pipeline.

Every value is resolved here and nowhere else in the CLI; the pipeline receives the results.
Notices about the device (a missing accelerator, `--vram` on a machine without a GPU) are collected
here and printed once, after the plan is known to fit; the runtime's own warnings while loading (a
preset made for another device) become one-line notices too.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lite.cli.report import load_report_cpu, notice, say
from lite.errors import InputError, Notice
from lite.runtime.cpu.threads import configure_threads as configure
from lite.runtime.engine_choice import EngineChoice, check_engine, check_engine_source

if TYPE_CHECKING:  # torch and the model layer load after the arguments are checked
    from lite.runtime.resolve import ResolvedRun


@dataclass
class RunConfig:
    """The resolved run the CLI hands the runtime as it is (`OvisPipeline.load`), plus what it reports."""

    resolved: ResolvedRun
    machine: Any  # lite.runtime.machine.Machine
    notices: list[str] = field(default_factory=list)

    @property
    def preset(self) -> Any:  # lite.runtime.presets.Preset
        return self.resolved.preset

    @property
    def config(self) -> Any:  # lite.model.config.OvisU1Config
        return self.resolved.config


def configure_threads(threads: int | None) -> None:
    """--threads N (default: physical cores), through the CPU threads module."""
    configure(threads)


def progress_enabled(args: argparse.Namespace) -> bool:
    """Bars only for a person watching: never into a log or a pipe, never with --quiet."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def resolve_run(args: argparse.Namespace, task: str, width: int, height: int) -> RunConfig:
    """The user's preset (checked to fit) or the best one for this machine, and where it runs."""
    # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
    from lite.runtime import planning
    from lite.runtime.devices import resolve_device, resolve_dtype
    from lite.runtime.machine import detect_machine
    from lite.runtime.presets import get_preset
    from lite.runtime.resolve import ResolvedRun, read_checkpoint

    preset = get_preset(args.preset) if args.preset else None  # unknown names fail before anything loads
    device, fallback = resolve_device(args.device)
    engine = getattr(args, "llm_engine", None) or EngineChoice()
    check_engine(engine, device)  # llama.cpp: on the CPU, and installed
    notices = [fallback] if fallback else []
    directory, config, pp, kind = read_checkpoint(args.model)  # every file check before any weight is read
    check_engine_source(engine, directory, kind.value == "prequantized")
    config.qwen3_config()  # transformers' own checks of llm_config, before anything loads
    machine = detect_machine(device, args.vram, args.ram)
    if preset is None:
        preset, why = planning.choose_preset(machine, config, pp, task, width, height)
        notices.append(why)
    else:
        planning.check_fits(preset, config, pp, task, width, height, machine)
    made_for = prequantized_origin(directory, kind, preset.name, device.type)
    if made_for:
        notices.append(made_for)
    if args.vram is not None and device.type == "cpu":
        notices.append("--vram only chose the preset: there is no GPU here, so this run uses the CPU")
    dtype = resolve_dtype(args.dtype) if args.dtype != "auto" else None
    configure_threads(args.threads)
    resolved = ResolvedRun(directory, config, pp, device, dtype, preset, planning.effective_budget(preset, machine),
                           kind, progress=progress_enabled(args), llm_engine=engine)
    return RunConfig(resolved, machine, notices)


def prequantized_origin(directory: Path, kind: Any, preset: str, device_type: str) -> str | None:
    """For a checkpoint written by `ovis-lite quantize` (`kind`, as resolved): the preset and device its weights
    were made for."""
    # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
    from lite.model.checkpoint import CheckpointKind
    from lite.model.prequantized import read_checkpoint_manifest

    if kind is not CheckpointKind.PREQUANTIZED:
        return None
    manifest = read_checkpoint_manifest(directory)
    made = (str(manifest.get("policy")), str(manifest.get("target_device_type")))
    differs = "" if made == (preset, device_type) else f"; this run uses preset {preset} on {device_type}"
    return f"{directory.name} holds weights pre-quantized for preset {made[0]} on {made[1]}{differs}"


def check_max_new_tokens(config: Any, max_new_tokens: int) -> None:
    limit = config.answer_token_limit
    if max_new_tokens > limit:
        raise InputError(f"--max-new-tokens {max_new_tokens} is past the model's context: at most {limit} "
                         f"(the LLM's {config.llm.get('max_position_embeddings')} positions less the "
                         f"{config.multimodal_max_length}-token prompt window)")


def load_pipeline(run: RunConfig, args: argparse.Namespace) -> Any:
    """Load once; print the notices and the load report (one line each)."""
    # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
    from lite.memory import format_bytes
    from lite.runtime.pipeline import OvisPipeline

    for line in run.notices:
        notice(args, line)
    with warnings.catch_warnings(record=True) as caught:  # the runtime's notices, as one line each
        warnings.simplefilter("always", Notice)
        pipe = OvisPipeline.load(run.resolved)
        pipe.caches.set_enabled(not getattr(args, "no_cache", False))  # --no-cache
    for warning in caught:
        if issubclass(warning.category, Notice):
            notice(args, str(warning.message))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    pipe.notify = lambda message: notice(args, message)
    rep = pipe.load_report
    if rep is not None:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in rep.component_bytes.items())
        paging = _paging_budget(pipe)
        where = f"{run.resolved.device}" + (f", paging within {format_bytes(paging)}" if paging else "")
        say(args, f"ovis-lite: loaded {rep.path} ({run.preset.name}) on {where} in {rep.seconds:.1f} s: {parts}; "
                  f"host RssAnon peak {format_bytes(rep.peak_rss_anon_bytes)}")
    for line in load_report_cpu(pipe):  # the CPU plan (h1: surgical)
        say(args, line)
    engine = getattr(pipe, "llm_engine", None)
    if engine is not None:
        say(args, f"ovis-lite: the LLM of understanding runs on llama.cpp ({engine.gguf_format}, "
                  f"{format_bytes(engine.path.stat().st_size)} mapped from {engine.path}; its KV takes "
                  f"{format_bytes(engine.kv_bytes_per_position * 1024)} per 1024 positions of context)")
    return pipe


def _paging_budget(pipe: Any) -> int | None:
    """The budget the weights page within, or None when they stay resident."""
    session = getattr(pipe, "offload", None)
    settings = getattr(session, "settings", session)
    return getattr(settings, "budget_bytes", None)
