"""The one planning function (`plan_workload`) and what is built on it: a preset's planned peak, the preset
table, whether a preset fits this machine, and the automatic choice.

Planning works on a `meta` model (sizes from the quantized layouts, no weight read) or on a loaded one
(its real bytes); the CLI, `presets`, `plan` and the pipeline's offload session all go through here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from offload import BudgetError, Plan, plan
from offload.units import Unit

from lite.errors import InputError
from lite.memory import format_bytes
from lite.model.config import OvisU1Config, PreprocessorConfig
from lite.model.host_plan import HostPlan, host_plan
from lite.model.memory_profile import Workload, activation_bytes, ovis_units, resize_units
from lite.model.sizes import module_bytes, quantized_bytes
from lite.model.skeleton import skeleton_model
from lite.runtime.machine import GiB, Machine
from lite.runtime.presets import PRESETS, Preset

RESIDENT_BUDGET = 10**15  # "no budget": the planner keeps everything resident

_META_MODELS: dict[int, tuple[OvisU1Config, Any]] = {}
_MODULE_BYTES: dict[tuple[int, str, str], dict[str, int]] = {}


def plan_workload(model: nn.Module, config: OvisU1Config, pp: PreprocessorConfig, wl: Workload,
                  budget: int | None, prefetch_depth: int = 1,
                  module_bytes: dict[str, int] | None = None, reserve_bytes: int = 0) -> tuple[list[Unit], Plan]:
    """Units and the offload plan of one workload within `budget` (None: all resident).

    Tries LLM groups of 4, 2, then 1 layers: bigger groups mean fewer transfers, smaller ones fit
    tighter budgets. When none fits, the BudgetError with the smallest minimum is raised, so the
    message names the best that could work. `module_bytes` re-sizes units (a quantized layout on meta).
    `reserve_bytes` stays held on the device beside the plan (the pipeline's caches).
    """
    act = activation_bytes(config, pp, wl)
    if budget is None:
        units = resize_units(ovis_units(model, wl), model, module_bytes)
        return units, plan(RESIDENT_BUDGET, units, act, max_prefetch_depth=0)
    error: BudgetError | None = None
    for llm_group in (4, 2, 1):
        units = resize_units(ovis_units(model, wl, llm_group=llm_group), model, module_bytes)
        try:
            return units, plan(budget, units, act, max_prefetch_depth=prefetch_depth, reserve_bytes=reserve_bytes)
        except BudgetError as exc:
            error = exc if error is None or exc.min_budget_bytes < error.min_budget_bytes else error
    raise error  # type: ignore[misc]


def _meta_model(config: OvisU1Config) -> Any:
    """One meta skeleton per config object (building it is the slow part of planning)."""
    hit = _META_MODELS.get(id(config))
    if hit is None or hit[0] is not config:
        hit = _META_MODELS[id(config)] = (config, skeleton_model(config))
    return hit[1]


def preset_workload(preset: Preset, task: str, width: int, height: int, device_type: str,
                    max_new_tokens: int = 1024) -> Workload:
    nfe = preset.nfe(task) if task != "understand" else None
    vae_dtype = preset.precision.policy(device_type).vae_dtype
    # A CPU without native bf16 computes in fp32 (lite/runtime/loading.py): plan for the wider activations
    # wherever the run could land on one, so a plan is an upper bound on every CPU.
    dtype_bytes = 4 if device_type == "cpu" else 2
    return Workload(task, width=width, height=height, steps=preset.steps, nfe=nfe, device_type=device_type,
                    max_new_tokens=max_new_tokens, vae_tile=preset.vae_tile, dtype_bytes=dtype_bytes,
                    vae_dtype_bytes=torch.finfo(vae_dtype).bits // 8)


def module_bytes_for(preset: Preset, model: Any, device_type: str) -> dict[str, int]:
    """Qualified module name -> bytes it owns once the preset's precision is applied."""
    key = (id(model), preset.precision.name, device_type)
    if key not in _MODULE_BYTES:
        _MODULE_BYTES[key] = module_bytes(model, preset.precision.policy(device_type))
    return _MODULE_BYTES[key]


def pages(preset: Preset, budget_bytes: int | None) -> bool:
    """Whether a run of `preset` pages weights through the device (else everything stays resident)."""
    return preset.offload and (budget_bytes if budget_bytes is not None else preset.budget_bytes) is not None


def plan_preset(preset: Preset, config: OvisU1Config, pp: PreprocessorConfig, task: str, width: int = 1024,
                height: int = 1024, device_type: str = "cuda", budget_bytes: int | None = None) -> Plan:
    """The offload plan (or the all-resident footprint) of `preset` for one task and size."""
    model = _meta_model(config)
    wl = preset_workload(preset, task, width, height, device_type)
    budget = (budget_bytes if budget_bytes is not None else preset.budget_bytes) if pages(preset, budget_bytes) \
        else None
    return plan_workload(model, config, pp, wl, budget, 1, module_bytes_for(preset, model, device_type))[1]


#: How a phase is named where the task gives it another meaning (understanding's one phase is the answer).
PHASE_LABELS = {("understand", "conditions"): "answer"}


def task_phases(phase_peaks: dict[str, int], task: str) -> list[str]:
    """The phases a task runs: understanding builds no latent, so it has no denoise or decode."""
    return ["conditions"] if task == "understand" else list(phase_peaks)


def resident_peak(p: Plan) -> int:
    """For an all-resident plan: every weight of the task on the device, plus the worst activation."""
    return p.resident_weight_bytes + max(p.activation_bytes.values(), default=0)


def host_plan_of(preset: Preset, config: OvisU1Config, pp: PreprocessorConfig, task: str, width: int = 1024,
                 height: int = 1024) -> HostPlan:
    """What a CPU run of `preset` holds in host memory, anonymous and mapped, per phase (lite.model.host_plan)."""
    model = _meta_model(config)
    wl = preset_workload(preset, task, width, height, "cpu")
    return host_plan(model, config, pp, wl, preset.precision.policy("cpu"),
                     sizes=module_bytes_for(preset, model, "cpu"))


def planned_peak(preset: Preset, config: OvisU1Config, pp: PreprocessorConfig, task: str, width: int = 1024,
                 height: int = 1024, device_type: str = "cuda", budget_bytes: int | None = None) -> int:
    """The planned peak: of the device while paging, else of everything resident; on a CPU, the host plan's."""
    if device_type == "cpu" and not pages(preset, budget_bytes):
        return host_plan_of(preset, config, pp, task, width, height).peak.total
    p = plan_preset(preset, config, pp, task, width, height, device_type, budget_bytes)
    return p.planned_peak_bytes if pages(preset, budget_bytes) else resident_peak(p)


def _peak_or_none(preset: Preset, config: OvisU1Config, pp: PreprocessorConfig, task: str,
                  device_type: str) -> int | None:
    try:
        return planned_peak(preset, config, pp, task, 1024, 1024, device_type)
    except BudgetError:
        return None


def planned_device(preset: Preset, device_type: str) -> str:
    """The device a preset is planned for: the one asked for if it runs there, else its own."""
    return device_type if device_type in preset.devices else preset.devices[0]


def preset_table(config: OvisU1Config, pp: PreprocessorConfig, device_type: str = "cuda") -> list[dict[str, Any]]:
    """The rows of `ovis-lite presets --json`."""
    rows = []
    for preset in PRESETS.values():
        dev = planned_device(preset, device_type)
        rows.append({
            "name": preset.name, "description": preset.description, "budget_bytes": preset.budget_bytes,
            "precision": preset.precision.name, "precision_detail": preset.precision.description,
            "solver": preset.solver, "spacing": preset.spacing, "steps": preset.steps,
            "cfg_interval": list(preset.cfg_interval) if preset.cfg_interval else None,
            "vae_tile": preset.vae_tile, "offload": preset.offload, "devices": list(preset.devices),
            "nfe": {"t2i": preset.nfe("t2i"), "edit": preset.nfe("edit")},
            "planned_for": dev,
            "planned_peak_bytes": {key: _peak_or_none(preset, config, pp, task, dev)
                                   for key, task in (("understand", "understand"), ("t2i_1024", "t2i"),
                                                     ("edit_1024", "edit"))},
        })
    return rows


def host_bytes_needed(preset: Preset, config: OvisU1Config) -> int:
    """Host RAM to hold the weights in the preset's precision (offloaded weights live there), plus slack."""
    return int(quantized_bytes(config, preset.precision, "cpu")["total_bytes"] * 1.1) + 2 * GiB


def effective_budget(preset: Preset, machine: Machine) -> int | None:
    """The budget a run plans for: the preset's, capped by what the device has free."""
    if preset.budget_bytes is None or not preset.offload or machine.device_free is None:
        return preset.budget_bytes
    return min(preset.budget_bytes, machine.device_free)


def choose_preset(machine: Machine, config: OvisU1Config, pp: PreprocessorConfig, task: str, width: int,
                  height: int) -> tuple[Preset, str]:
    """The first preset of the table offered to this device type that fits this task and size, and why.

    A paging preset applies to cards with at least ~90% of its budget in total memory (unless it
    takes any card), its plan must fit the memory that is free now, and its weights the host RAM.
    """
    size = f"{task} {width}x{height}" if task != "understand" else "understand"
    free, total = machine.device_free, machine.device_total or 0
    skipped: list[str] = []
    for p in (p for p in PRESETS.values() if machine.device_type in p.auto_on):
        if p.budget_bytes is not None and not p.any_card and total < 0.9 * p.budget_bytes:
            skipped.append(f"{p.name} is for {p.budget_bytes / GiB:.0f} GB cards")
            continue
        try:
            need = planned_peak(p, config, pp, task, width, height, machine.device_type, effective_budget(p, machine))
        except BudgetError as exc:
            skipped.append(f"{p.name} needs {exc.min_budget_bytes / GiB:.1f} GiB")
            continue
        if free is not None and need > free:
            skipped.append(f"{p.name} needs {need / GiB:.1f} GiB")
            continue
        if p.offload and host_bytes_needed(p, config) > machine.ram_bytes:
            skipped.append(f"{p.name} needs more host RAM")
            continue
        why = f" ({skipped[0]})" if skipped else ""
        return p, f"preset {p.name}: {machine.describe()}; its plan for {size} peaks at {need / GiB:.1f} GiB{why}"
    raise InputError(f"no preset fits {size} on {machine.describe()} ({'; '.join(skipped[-2:])}); "
                     f"use a smaller size or --device cpu")


def check_fits(preset: Preset, config: OvisU1Config, pp: PreprocessorConfig, task: str, width: int, height: int,
               machine: Machine) -> int:
    """The planned peak of a user-chosen preset, or a one-line error naming what would fit."""
    budget = effective_budget(preset, machine)
    cap = machine.device_free if machine.device_type != "cpu" else None
    device_type = planned_device(preset, machine.device_type)
    try:
        need = planned_peak(preset, config, pp, task, width, height, device_type, budget)
    except BudgetError as exc:
        need = exc.min_budget_bytes
    limit = budget if budget is not None else cap
    if limit is not None and need > limit:
        side = largest_fitting_size(preset, config, pp, task, limit, device_type)
        hint = f"the largest square size that fits is {side}x{side}" if side else "no size fits"
        raise InputError(f"preset {preset.name} needs {format_bytes(need)} for {task} {width}x{height} but has "
                         f"{format_bytes(limit)}; {hint}, or choose a smaller preset")
    return need


def largest_fitting_size(preset: Preset, config: OvisU1Config, pp: PreprocessorConfig, task: str,
                         budget: int, device_type: str = "cuda") -> int | None:
    """Largest square side (multiple of 64) whose plan fits `budget` with this preset."""
    best = None
    for side in range(256, 4096 + 1, 64):
        try:
            if planned_peak(preset, config, pp, task, side, side, device_type, budget) > budget:
                break
        except BudgetError:
            break
        best = side
    return best


def _sampler_text(row: dict[str, Any]) -> str:
    names = {"euler": "Euler", "heun": "Heun", "dpmpp_2m": "DPM++ 2M", "unipc": "UniPC"}
    text = f"{names.get(row['solver'], row['solver'])} {row['steps']}"
    if row["cfg_interval"]:
        text += f", CFG for t ≥ {row['cfg_interval'][0]:g}"
    return f"{text} ({row['nfe']['t2i']} / {row['nfe']['edit']})"


def preset_lines(rows: list[dict[str, Any]]) -> list[str]:
    """`ovis-lite presets` as plain text, the README's columns in lines of at most 100 characters; the last
    column says which device each row was planned for (the README plans every preset for its own device)."""
    head = f"{'preset':<10} {'for':<13} {'sampler (NFE t2i / edit)':<35} {'understand':>10} {'t2i 1024²':>10} " \
           f"{'edit 1024²':>10} on"
    lines = [head]
    for row in rows:
        peaks = [f"{v / GiB:.2f} GiB" if v is not None else "n/a" for v in row["planned_peak_bytes"].values()]
        lines.append(f"{row['name']:<10} {PRESETS[row['name']].audience:<13} {_sampler_text(row):<35} "
                     f"{peaks[0]:>10} {peaks[1]:>10} {peaks[2]:>10} {row['planned_for']}")
    moved = [row for row in rows if row["planned_for"] != PRESETS[row["name"]].devices[0]]
    for row in moved:  # the README plans every preset for its own device
        lines.append(f"note: {row['name']} is planned for {row['planned_for']} here; the README's row is for "
                     f"{PRESETS[row['name']].devices[0]} (presets --device cuda)")
    return lines


def preset_markdown(config: OvisU1Config, pp: PreprocessorConfig) -> str:
    """The README's preset table, from the presets and the planner (each preset planned for its own device)."""
    lines = ["| preset | for | precision | sampler (NFE t2i / edit) | understand | t2i 1024² | edit 1024² |",
             "|---|---|---|---|---|---|---|"]
    for row in preset_table(config, pp, "cuda"):
        preset = PRESETS[row["name"]]
        peaks = [f"{v / GiB:.2f} GiB" if v is not None else "n/a" for v in row["planned_peak_bytes"].values()]
        lines.append(f"| `{preset.name}` | {preset.audience} | {preset.precision.summary} | {_sampler_text(row)} | "
                     + " | ".join(peaks) + " |")
    return "\n".join(lines)
