"""The commands that load no model: inspect, presets, plan, info, make-tiny, quantize, demo.

They import only what they use: config arithmetic and the planner, never the pipeline.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import psutil

from offload.planner import BudgetError

from lite.cli.runconfig import progress_enabled
from lite.errors import InputError, OutputError
from lite.model.config import PreprocessorConfig, load_config, load_preprocessor_config
from lite.runtime.metadata import format_metadata, read_metadata

GiB = 1 << 30


def config_source(args: argparse.Namespace) -> Path:
    """--model DIR, --config FILE, or the real Ovis-U1-3B config shipped with ovis-lite."""
    if getattr(args, "model", None):
        # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
        from lite.model.checkpoint import find_checkpoint

        return find_checkpoint(args.model)
    if getattr(args, "config", None):
        return Path(args.config)
    return Path(str(resources.files("lite").joinpath("data/config.json")))


def _configs(args: argparse.Namespace) -> tuple[Any, Any]:
    source = config_source(args)
    return load_config(source), (load_preprocessor_config(source) if source.is_dir() else PreprocessorConfig())


def detected_device_type() -> str:
    # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
    from lite.runtime.devices import resolve_device

    return resolve_device("auto")[0].type


def cmd_inspect(args: argparse.Namespace) -> int:
    # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
    from lite.model.sizes import format_inspect, format_quantized_bytes, inspect_config, quantized_bytes

    config, _ = _configs(args)
    if args.preset:
        # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
        from lite.runtime.presets import get_preset

        preset = get_preset(args.preset)
        result = quantized_bytes(config, preset.precision, "cuda" if "cuda" in preset.devices else preset.devices[0])
        if args.tensors:
            result["tensors"] = inspect_config(config, tensors=True)["tensors"]
        print(json.dumps(result) if args.json else format_quantized_bytes(result))
        return 0
    result = inspect_config(config, tensors=args.tensors)
    print(json.dumps(result) if args.json else format_inspect(result))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    config, pp = _configs(args)
    device = detected_device_type() if args.device == "auto" else args.device
    # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
    from lite.runtime.planning import preset_table

    if getattr(args, "markdown", False):
        # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
        from lite.runtime.planning import preset_markdown

        print(preset_markdown(config, pp))
        return 0
    rows = preset_table(config, pp, device)
    if args.json:
        print(json.dumps(rows))
        return 0
    # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
    from lite.runtime.planning import preset_lines

    print("\n".join(preset_lines(rows)))
    return 0


def plan_device(args: argparse.Namespace, preset: Any) -> str:
    """The device told; else a preset's own device (when this machine's is not one of them); else the
    device found here (`--vram` pretends a GPU: CUDA unless this is a Mac)."""
    if args.device != "auto":
        return args.device
    found = detected_device_type()
    if preset is not None:
        # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
        from lite.runtime.planning import planned_device

        return planned_device(preset, found)
    if args.vram is not None and found == "cpu":
        return "cuda"
    return found


def plan_machine(args: argparse.Namespace, device: str) -> Any:
    """The machine a run would see (as `ovis-lite generate` detects it), or the one --device/--vram/--ram
    describe: a device that is not here is assumed to have unknown free memory."""
    # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
    import torch

    # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
    from lite.runtime.machine import Machine, detect_machine

    if device == detected_device_type() or args.vram is not None:
        return detect_machine(torch.device(device), args.vram, args.ram)
    ram = args.ram if args.ram is not None else int(psutil.virtual_memory().available)
    return Machine(device, None, None, ram, detected=False)


def _bf16_with_budget(budget: int) -> Any:
    # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
    from lite.runtime.presets import PRESETS

    return replace(PRESETS["reference"], name="bf16", description="bf16 weights paged within the budget",
                   budget_bytes=budget, offload=True)


def _plan_for_budget(config: Any, pp: Any, args: argparse.Namespace, device: str) -> tuple[Any, Any, str | None]:
    """bf16 paged within the budget; when bf16 cannot fit, the most precise paging preset that fits."""
    # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
    from lite.runtime import planning
    from lite.runtime.presets import PRESETS
    if device == "cpu":
        raise InputError("--budget is the GPU memory weights page through, and on a CPU nothing pages; give "
                         "--device cuda to plan for a GPU, or --ram 8GB to plan for a host with that much memory")
    candidates = [_bf16_with_budget(args.budget)] + [p for p in PRESETS.values() if p.offload and p.budget_bytes]
    first_error: BudgetError | None = None
    for preset in candidates:
        try:
            plan = planning.plan_preset(preset, config, pp, args.task, args.width, args.height, device, args.budget)
        except BudgetError as exc:
            first_error = first_error or exc
            last_error = exc
            continue
        why = None if preset is candidates[0] else (
            f"bf16 needs at least {first_error.min_budget_bytes / GiB:.2f} GiB here; preset {preset.name} "
            f"fits {args.budget / GiB:.2f} GiB" if first_error else None)
        return preset, plan, why
    raise last_error


def _task_size(args: argparse.Namespace) -> str:
    """`t2i 240x240` (the floored size the image will have); an answer has no output size."""
    return args.task if args.task == "understand" else f"{args.task} {args.width}x{args.height}"


def cmd_plan(args: argparse.Namespace) -> int:
    # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
    from lite.runtime import planning
    from lite.runtime.presets import get_preset

    config, pp = _configs(args)
    preset = get_preset(args.preset) if args.preset else None
    device = plan_device(args, preset)
    notes = []
    if args.task != "understand" and (args.width % 16 or args.height % 16):
        notes.append(f"{args.width}x{args.height} is floored to multiples of 16, as a run floors it")
        args.width, args.height = args.width // 16 * 16, args.height // 16 * 16
    if preset is not None:
        budget = args.budget if args.budget is not None else preset.budget_bytes
        plan = planning.plan_preset(preset, config, pp, args.task, args.width, args.height, device, budget)
    elif args.budget is not None:
        budget = args.budget
        preset, plan, why = _plan_for_budget(config, pp, args, device)
        notes += [why] if why else []
    else:  # what a run would choose on this machine (or the one --device/--vram/--ram describe)
        machine = plan_machine(args, device)
        preset, why = planning.choose_preset(machine, config, pp, args.task, args.width, args.height)
        device, budget = planning.planned_device(preset, machine.device_type), planning.effective_budget(preset, machine)
        notes.append(why if machine.device_free is not None or machine.device_type == "cpu" else
                     f"there is no {device} here: its first preset, {preset.name}, is planned "
                     f"(--vram 6GB chooses for a card with that much free memory)")
        plan = planning.plan_preset(preset, config, pp, args.task, args.width, args.height, device, budget)
    resident = not planning.pages(preset, budget)
    peak = planning.resident_peak(plan) if resident else plan.planned_peak_bytes
    host = planning.host_plan_of(preset, config, pp, args.task, args.width, args.height) \
        if device == "cpu" and resident else None  # host memory: anonymous + mapped per phase (h7)
    if host is not None:
        peak = host.peak.total
    if resident and budget is not None and peak > budget:
        raise InputError(f"preset {preset.name} keeps every weight on the device: it needs {peak / GiB:.2f} GiB "
                         f"for {_task_size(args)}, more than the {budget / GiB:.2f} GiB budget; "
                         f"choose a preset that pages (e.g. --preset tiny)")
    phases = planning.task_phases(plan.phase_peaks, args.task)
    result = {
        "task": args.task, "width": args.width, "height": args.height, "preset": preset.name, "device": device,
        "budget_bytes": budget, "planned_peak_bytes": peak, "resident": resident,
        "phase_peaks": {k: plan.phase_peaks[k] for k in phases},
        "activation_bytes": {k: plan.activation_bytes[k] for k in phases},
        "resident_weight_bytes": plan.resident_weight_bytes, "paged_units": plan.paged_units,
        "resident_units": len(plan.resident_units), "prefetch_depth": plan.prefetch_depth,
        "min_budget_bytes": plan.min_budget_bytes,
        "nfe": preset.nfe(args.task) if args.task != "understand" else 0, "note": "; ".join(notes) or None,
        "host": {phase: {"anon_bytes": h.anon, "mapped_bytes": h.mapped} for phase, h in host.phases.items()}
        if host is not None else None,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    for note in notes:
        print(f"note: {note}")
    within = f"of a {budget / GiB:.2f} GiB budget" if budget is not None else "(all resident, no budget)"
    paging = f"; {len(plan.paged_units)} paged unit(s), prefetch {plan.prefetch_depth}" if not resident else ""
    nfe = f"; NFE {result['nfe']}" if result["nfe"] else ""
    print(f"{_task_size(args)} with {preset.name} on {device}: planned peak {peak / GiB:.2f} GiB "
          f"{within}{paging}{nfe}")
    if host is not None:  # what the run's summary measures: resident = anonymous + mapped checkpoint pages
        for phase, h in host.phases.items():
            label = planning.PHASE_LABELS.get((args.task, phase), phase)
            act = plan.activation_bytes.get(phase, 0) if phase != "load" else 0
            print(f"  {label:<10} {h.total / GiB:6.2f} GiB host (anonymous {h.anon / GiB:.2f} incl. activations "
                  f"{act / GiB:.2f}, mapped {h.mapped / GiB:.2f})")
        return 0
    for phase in phases:
        label = planning.PHASE_LABELS.get((args.task, phase), phase)
        print(f"  {label:<10} {plan.phase_peaks[phase] / GiB:6.2f} GiB "
              f"(activations {plan.activation_bytes[phase] / GiB:.2f})")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
    from lite.model.prequantized_save import save_quantized_checkpoint
    from lite.runtime.presets import get_preset

    preset = get_preset(args.preset)
    check_new_folder(args.out, "--out")
    manifest = save_quantized_checkpoint(args.model, preset.precision, args.out, device_type=args.device,
                                         progress=progress_enabled(args))
    size = sum(manifest.get("component_bytes", {}).values()) / GiB
    print(f"ovis-lite: wrote {args.out}: weights pre-quantized for preset {preset.name} on {args.device} "
          f"({preset.precision.summary}; {size:.2f} GiB); run it with --model {args.out} --preset {preset.name}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    meta = read_metadata(args.image)
    print(json.dumps(meta, sort_keys=True) if args.json else format_metadata(meta))
    return 0


def check_new_folder(out: str, option: str, overwrite: bool | None = None) -> None:
    """A folder we are about to fill: new or empty (or --overwrite, where the command has it: not None),
    checked before any heavy import or work."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {out} is a file; give a new folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        hint = "" if overwrite is None else ", or pass --overwrite to replace the checkpoint in it"
        raise OutputError(f"{option} {out} is not empty; choose a new folder{hint}")


def cmd_make_tiny(args: argparse.Namespace) -> int:
    check_new_folder(args.out, "the folder", args.overwrite)
    import torch  # heavy: only once the folder is known to be usable

    # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
    from lite.model.tiny import make_tiny

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    path = make_tiny(args.out, seed=args.seed, dtype=dtype, overwrite=args.overwrite)
    print(f"ovis-lite: wrote a tiny random checkpoint (seed {args.seed}) to {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
    from lite.cli.demo import run_demo

    run_demo(Path(args.out), quiet=args.quiet, overwrite=args.overwrite)
    return 0
