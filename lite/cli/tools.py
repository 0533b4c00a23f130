"""The commands that load no model: inspect, presets, plan, info, make-tiny, quantize, demo.

They import only what they use: config arithmetic and the planner, never the pipeline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lite.cli.runconfig import progress_enabled

GiB = 1 << 30


def config_source(args: argparse.Namespace) -> Path:
    """--model DIR, --config FILE, or the real Ovis-U1-3B config shipped with ovis-lite."""
    from importlib import resources

    if getattr(args, "model", None):
        from lite.model.checkpoint import find_checkpoint

        return find_checkpoint(args.model)
    if getattr(args, "config", None):
        return Path(args.config)
    return Path(str(resources.files("lite").joinpath("data/config.json")))


def _configs(args: argparse.Namespace) -> tuple[Any, Any]:
    from lite.model.config import PreprocessorConfig, load_config, load_preprocessor_config

    source = config_source(args)
    return load_config(source), (load_preprocessor_config(source) if source.is_dir() else PreprocessorConfig())


def detected_device_type() -> str:
    from lite.runtime.devices import resolve_device

    return resolve_device("auto")[0].type


def cmd_inspect(args: argparse.Namespace) -> int:
    from lite.model.sizes import format_inspect, format_quantized_bytes, inspect_config, quantized_bytes

    config, _ = _configs(args)
    if args.preset:
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
    from lite.runtime.planning import preset_table

    if getattr(args, "markdown", False):
        from lite.runtime.planning import preset_markdown

        print(preset_markdown(config, pp))
        return 0
    rows = preset_table(config, pp, device)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'preset':<10} {'budget':>7} {'sampler':<18} {'NFE t2i/edit':>12} {'understand':>10} {'t2i 1024':>9} "
          f"{'edit 1024':>9}  description")
    for r in rows:
        budget = f"{r['budget_bytes'] / GiB:.0f} GiB" if r["budget_bytes"] else "-"
        peaks = {k: (f"{v / GiB:.2f}G" if v is not None else "n/a") for k, v in r["planned_peak_bytes"].items()}
        print(f"{r['name']:<10} {budget:>7} {r['solver'] + '/' + r['spacing'] + ' ' + str(r['steps']):<18} "
              f"{str(r['nfe']['t2i']) + '/' + str(r['nfe']['edit']):>12} {peaks['understand']:>10} "
              f"{peaks['t2i_1024']:>9} {peaks['edit_1024']:>9}  {r['description']} [{r['planned_for']}]")
    return 0


def plan_device(args: argparse.Namespace, preset: Any) -> str:
    """The device told; else a preset's own device (when this machine's is not one of them); else,
    with a budget, the accelerator found here (CUDA when there is none: a budget is GPU memory);
    else the device found here."""
    if args.device != "auto":
        return args.device
    found = detected_device_type()
    if preset is not None:
        from lite.runtime.planning import planned_device

        return planned_device(preset, found)
    if args.budget is not None and found == "cpu":
        return "cuda"
    return found


def _bf16_with_budget(budget: int) -> Any:
    from dataclasses import replace

    from lite.runtime.presets import PRESETS

    return replace(PRESETS["reference"], name="bf16", description="bf16 weights paged within the budget",
                   budget_bytes=budget, offload=True)


def _plan_for_budget(config: Any, pp: Any, args: argparse.Namespace, device: str) -> tuple[Any, Any, str | None]:
    """bf16 paged within the budget; when bf16 cannot fit, the most precise paging preset that fits."""
    from lite.runtime import planning
    from lite.runtime.presets import PRESETS
    from offload.planner import BudgetError

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


def cmd_plan(args: argparse.Namespace) -> int:
    from lite.errors import InputError
    from lite.runtime import planning
    from lite.runtime.presets import PRESETS, get_preset

    config, pp = _configs(args)
    preset = get_preset(args.preset) if args.preset else None
    device = plan_device(args, preset)
    note = None
    if preset is not None:
        budget = args.budget if args.budget is not None else preset.budget_bytes
        plan = planning.plan_preset(preset, config, pp, args.task, args.width, args.height, device, budget)
    elif args.budget is not None:
        budget = args.budget
        preset, plan, note = _plan_for_budget(config, pp, args, device)
    else:
        preset, budget = PRESETS["reference"], None
        plan = planning.plan_preset(preset, config, pp, args.task, args.width, args.height, device, None)
    resident = not planning.pages(preset, budget)
    peak = planning.resident_peak(plan) if resident else plan.planned_peak_bytes
    if resident and budget is not None and peak > budget:
        raise InputError(f"preset {preset.name} keeps every weight on the device: it needs {peak / GiB:.2f} GiB "
                         f"for {args.task} {args.width}x{args.height}, more than the {budget / GiB:.2f} GiB budget; "
                         f"choose a preset that pages (e.g. --preset tiny)")
    result = {
        "task": args.task, "width": args.width, "height": args.height, "preset": preset.name, "device": device,
        "budget_bytes": budget, "planned_peak_bytes": peak, "resident": resident,
        "phase_peaks": plan.phase_peaks, "activation_bytes": plan.activation_bytes,
        "resident_weight_bytes": plan.resident_weight_bytes, "paged_units": plan.paged_units,
        "resident_units": len(plan.resident_units), "prefetch_depth": plan.prefetch_depth,
        "min_budget_bytes": plan.min_budget_bytes,
        "nfe": preset.nfe(args.task) if args.task != "understand" else 0, "note": note,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    if note:
        print(f"note: {note}")
    within = f"of a {budget / GiB:.2f} GiB budget" if budget is not None else "(all resident, no budget)"
    paging = f"; {len(plan.paged_units)} paged unit(s), prefetch {plan.prefetch_depth}" if not resident else ""
    nfe = f"; NFE {result['nfe']}" if result["nfe"] else ""
    print(f"{args.task} {args.width}x{args.height} with {preset.name} on {device}: planned peak "
          f"{peak / GiB:.2f} GiB {within}{paging}{nfe}")
    for phase, phase_peak in plan.phase_peaks.items():
        print(f"  {phase:<10} {phase_peak / GiB:6.2f} GiB (activations {plan.activation_bytes[phase] / GiB:.2f})")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from lite.model.prequantized_save import save_quantized_checkpoint
    from lite.runtime.presets import get_preset

    preset = get_preset(args.preset)
    manifest = save_quantized_checkpoint(args.model, preset.precision, args.out, device_type=args.device,
                                         progress=progress_enabled(args))
    print(f"ovis-lite: wrote {args.out} ({preset.name}: {manifest.get('policy', preset.precision.name)})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from lite.runtime.outputs import read_metadata

    meta = read_metadata(args.image)
    if args.json:
        print(json.dumps(meta, sort_keys=True))
        return 0
    for key, value in sorted(meta.items()):
        print(f"{_printable(str(key))}: {_printable(value if isinstance(value, str) else json.dumps(value))}")
    return 0


def _printable(text: str) -> str:
    """Control characters (terminal escapes) shown escaped, as --json does."""
    return "".join(c if c.isprintable() or c == " " else json.dumps(c)[1:-1] for c in text)


def cmd_make_tiny(args: argparse.Namespace) -> int:
    import torch

    from lite.model.tiny import make_tiny

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    path = make_tiny(args.out, seed=args.seed, dtype=dtype, overwrite=args.overwrite)
    print(f"ovis-lite: wrote a tiny random checkpoint (seed {args.seed}) to {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lite.cli.demo import run_demo

    run_demo(Path(args.out), quiet=args.quiet, overwrite=args.overwrite)
    return 0
