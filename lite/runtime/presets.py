"""Named quality-vs-memory presets, their planned peaks, and the automatic choice for a machine.

A preset bundles four things: the precision per component (`lite.model.quantization`), the device budget
the offload planner must fit (`offload/`), the solver, steps and guidance policy (`lite.sampling`),
and VAE tiling. Planned peaks are computed on a `meta` model: no weight is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from lite.model.config import OvisU1Config, PreprocessorConfig
from lite.errors import InputError
from lite.memory import format_bytes
from lite.model.memory_profile import CFG_PASSES, Workload, activation_bytes, ovis_units, plan_units, resize_units

GiB = 1 << 30


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    quant: str  # a policy name of lite.model.quantization
    budget_bytes: int | None  # device budget for the offload plan; None: everything stays resident
    solver: str = "euler"
    spacing: str = "linear"
    steps: int = 50
    cfg_interval: tuple[float, float] | None = None
    vae_tile: int | None = None  # tile side in px once an image side exceeds it
    devices: tuple[str, ...] = ("cuda", "mps", "cpu")
    offload: bool = True  # page through the device (False on unified memory and CPU)

    def nfe(self, task: str, tokens: int = 4096) -> int:
        """MMDiT evaluations per image at `tokens` target tokens (4096 = 1024x1024)."""
        return guided_nfe(task, self.solver, self.spacing, self.steps, self.cfg_interval, tokens)


def guided_nfe(task: str, solver: str, spacing: str, steps: int, interval: tuple[float, float] | None,
               tokens: int = 4096) -> int:
    """The conditional pass at every evaluation; the other CFG passes only where guidance is on."""
    from lite.sampling import make_timesteps, nfe, reference_schedule, time_shift_mu

    evaluations = nfe(solver, steps)
    passes = CFG_PASSES[task]
    if interval is None:
        return passes * evaluations
    if spacing == "linear":
        ts = reference_schedule(steps, tokens)
    else:
        ts = list(make_timesteps(steps, spacing, time_shift_mu(tokens)))
    visited = ts[:-1]
    guided = sum(1 for t in visited if interval[0] <= t <= interval[1])
    return evaluations + (passes - 1) * round(guided * evaluations / len(visited))


# Few-step settings measured in docs/sampling.md (analytic and tiny-model benchmarks).
FAST = dict(solver="unipc", spacing="karras", steps=15, cfg_interval=(0.1, 1.0))
LEAN = dict(solver="unipc", spacing="karras", steps=12, cfg_interval=(0.1, 1.0))
CPU_FAST = dict(solver="unipc", spacing="linear", steps=8)

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("reference", "bf16 everywhere, 50 Euler steps, all on the device: the reference's exact semantics",
           quant="reference", budget_bytes=None, offload=False),
    Preset("quality", "bf16 weights and reference sampling; components leave the device between phases (12 GB)",
           quant="quality", budget_bytes=12 * GiB, devices=("cuda",)),
    Preset("balanced", "for 8 GB GPUs: 4-bit LLM, 8-bit ViT/head/VTE/Yak, 15-step UniPC, CFG for t >= 0.1",
           quant="balanced", budget_bytes=8 * GiB, vae_tile=1024, devices=("cuda",), **FAST),
    Preset("low", "for 6 GB GPUs: the balanced formats, 12 steps, a 6 GB plan, VAE tiles from 768 px",
           quant="low", budget_bytes=6 * GiB, vae_tile=768, devices=("cuda",), **LEAN),
    Preset("tiny", "for 4 GB GPUs: 4-bit Yak too; blocks page when needed, 512 px VAE tiles",
           quant="tiny", budget_bytes=4 * GiB, vae_tile=512, devices=("cuda",), **LEAN),
    Preset("minimal", "for 2 GB: 4-bit ViT too; everything pages block by block, 512 px VAE tiles",
           quant="minimal", budget_bytes=2 * GiB, vae_tile=512, devices=("cuda",), **LEAN),
    Preset("mps", "Apple unified memory: small quanto weights, nothing pointlessly offloaded to the CPU",
           quant="mps", budget_bytes=None, offload=False, vae_tile=1024, devices=("mps",), **FAST),
    Preset("cpu", "plain CPU: only the LLM layers quantized (int4), bf16 elsewhere for AMX speed, 8-step UniPC",
           quant="cpu", budget_bytes=None, offload=False, devices=("cpu",), **CPU_FAST),
)}
GPU_ORDER = ("reference", "quality", "balanced", "low", "tiny", "minimal")


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def parse_bytes(text: str) -> int:
    """'6GB', '6 GiB', '512MB', '2.5G' -> bytes (GB and GiB both read as 2**30, as users mean)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise InputError(f"cannot read {text!r} as a size; write it like 6GB or 512MB")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    if m.group(2) == "" and m.group(3) is None:
        scale = 1 << 30  # a bare number means GB
    return int(float(m.group(1)) * scale)


# ---------------------------------------------------------------------------------------------
# Planned peaks on a meta model.
# ---------------------------------------------------------------------------------------------

_META_MODELS: dict[int, tuple[OvisU1Config, Any]] = {}
_MODULE_BYTES: dict[tuple[int, str, str], dict[str, int]] = {}


def _meta_model(config: OvisU1Config) -> Any:
    """One meta model per config object (building it is the slow part of planning)."""
    from lite.model.sizes import meta_model

    hit = _META_MODELS.get(id(config))
    if hit is None or hit[0] is not config:
        hit = _META_MODELS[id(config)] = (config, meta_model(config))
    return hit[1]


def preset_workload(preset: Preset, task: str, width: int, height: int, device_type: str,
                    max_new_tokens: int = 1024) -> Workload:
    from lite.model.quantization import policy_for

    nfe = preset.nfe(task) if task != "understand" else None
    vae_dtype = policy_for(preset.quant, device_type).vae_dtype
    return Workload(task, width=width, height=height, steps=preset.steps, nfe=nfe, device_type=device_type,
                    max_new_tokens=max_new_tokens, vae_tile=preset.vae_tile,
                    vae_dtype_bytes=torch.finfo(vae_dtype).bits // 8)


def module_bytes_for(preset: Preset, model: Any, device_type: str) -> dict[str, int]:
    """Qualified module name -> bytes it owns once the preset's precision policy is applied."""
    from lite.model.quantization import module_bytes, policy_for

    key = (id(model), preset.quant, device_type)
    if key not in _MODULE_BYTES:
        _MODULE_BYTES[key] = module_bytes(model, policy_for(preset.quant, device_type))
    return _MODULE_BYTES[key]


def plan_preset(preset: Preset, config: OvisU1Config, pp: PreprocessorConfig, task: str, width: int = 1024,
                height: int = 1024, device_type: str = "cuda", budget_bytes: int | None = None) -> Any:
    """The offload plan (or the all-resident footprint) of `preset` for one task and size."""
    from offload import plan

    model = _meta_model(config)
    wl = preset_workload(preset, task, width, height, device_type)
    act = activation_bytes(config, pp, wl)
    sizer = module_bytes_for(preset, model, device_type)
    budget = budget_bytes if budget_bytes is not None else preset.budget_bytes
    if budget is None or not preset.offload:
        units = resize_units(ovis_units(model, wl), model, sizer)
        return plan(10**15, units, act, max_prefetch_depth=0)
    return plan_units(model, wl, act, budget, 1, sizer)[1]


def resident_peak(p: Any) -> int:
    """For an all-resident plan: every weight of the task on the device, plus the worst activation."""
    return p.resident_weight_bytes + max(p.activation_bytes.values(), default=0)


def planned_peak(preset: Preset, config: OvisU1Config, pp: PreprocessorConfig, task: str, width: int = 1024,
                 height: int = 1024, device_type: str = "cuda", budget_bytes: int | None = None) -> int:
    p = plan_preset(preset, config, pp, task, width, height, device_type, budget_bytes)
    return resident_peak(p) if (budget_bytes or preset.budget_bytes) is None or not preset.offload \
        else p.planned_peak_bytes


def _peak_or_none(preset: Preset, config: OvisU1Config, pp: PreprocessorConfig, task: str,
                  device_type: str) -> int | None:
    from offload import BudgetError

    try:
        return planned_peak(preset, config, pp, task, 1024, 1024, device_type)
    except BudgetError:
        return None


def preset_table(config: OvisU1Config, pp: PreprocessorConfig, device_type: str = "cuda") -> list[dict[str, Any]]:
    """The rows of `ovis-lite presets --json`."""
    rows = []
    for preset in PRESETS.values():
        dev = device_type if device_type in preset.devices else preset.devices[0]
        rows.append({
            "name": preset.name, "description": preset.description, "budget_bytes": preset.budget_bytes,
            "quant": preset.quant, "solver": preset.solver, "spacing": preset.spacing, "steps": preset.steps,
            "cfg_interval": list(preset.cfg_interval) if preset.cfg_interval else None,
            "vae_tile": preset.vae_tile, "offload": preset.offload, "devices": list(preset.devices),
            "nfe": {"t2i": preset.nfe("t2i"), "edit": preset.nfe("edit")},
            "planned_for": dev,
            "planned_peak_bytes": {key: _peak_or_none(preset, config, pp, task, dev)
                                   for key, task in (("understand", "understand"), ("t2i_1024", "t2i"),
                                                     ("edit_1024", "edit"))},
        })
    return rows


# ---------------------------------------------------------------------------------------------
# The machine, and the automatic choice.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Machine:
    device_type: str  # cuda, mps or cpu
    device_total: int | None  # accelerator memory (MPS: the recommended working set)
    device_free: int | None
    ram_bytes: int
    detected: bool = True

    def describe(self) -> str:
        ram = f"{self.ram_bytes / GiB:.1f} GiB RAM"
        if self.device_type == "cpu":
            return f"CPU only, {ram}"
        kind = "CUDA" if self.device_type == "cuda" else "MPS"
        free = self.device_free or 0
        return f"{kind} with {free / GiB:.1f} of {(self.device_total or 0) / GiB:.1f} GiB free, {ram}"


def detect_machine(device: torch.device, vram: int | None = None, ram: int | None = None) -> Machine:
    """CUDA: torch.cuda.mem_get_info; MPS: its recommended maximum; host RAM: psutil.

    `vram`/`ram` pretend to be another machine (`--vram 6GB` on a CPU-only box plans for a 6 GB GPU).
    """
    import psutil

    host = ram if ram is not None else int(psutil.virtual_memory().available)
    if vram is not None:
        kind = device.type if device.type in ("cuda", "mps") else "cuda"
        return Machine(kind, vram, vram, host, detected=False)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return Machine("cuda", int(total), int(free), host, detected=ram is None)
    if device.type == "mps":
        usable = int(torch.mps.recommended_max_memory())
        return Machine("mps", usable, usable, host, detected=ram is None)
    return Machine("cpu", None, None, host, detected=ram is None)


def host_bytes_needed(preset: Preset, config: OvisU1Config) -> int:
    """Host RAM to hold the weights in the preset's precision (offloaded weights live there), plus slack."""
    from lite.model.quantization import quantized_bytes

    return int(quantized_bytes(config, preset.quant, "cpu")["total_bytes"] * 1.1) + 2 * GiB


def effective_budget(preset: Preset, machine: Machine) -> int | None:
    """The budget a run plans for: the preset's, capped by what the device has free."""
    if preset.budget_bytes is None or not preset.offload or machine.device_free is None:
        return preset.budget_bytes
    return min(preset.budget_bytes, machine.device_free)


def choose_preset(machine: Machine, config: OvisU1Config, pp: PreprocessorConfig, task: str, width: int,
                  height: int) -> tuple[Preset, str]:
    """The best preset that fits this task and size on this machine, and a one-line reason why.

    A GPU preset is a tier: it applies to cards with at least ~90% of its budget in total memory
    (minimal takes any card), and its plan must fit the memory that is free now.
    """
    from offload import BudgetError

    size = f"{task} {width}x{height}" if task != "understand" else "understand"
    if machine.device_type == "cpu":
        return PRESETS["cpu"], f"preset cpu: no GPU found ({machine.describe()})"
    if machine.device_type == "mps":
        p = PRESETS["mps"]
        need = planned_peak(p, config, pp, task, width, height, "mps")
        if need > (machine.device_free or 0):
            raise InputError(f"{size} plans {need / GiB:.1f} GiB with preset mps but this Mac offers "
                             f"{(machine.device_free or 0) / GiB:.1f} GiB; use a smaller size")
        return p, f"preset mps: {machine.describe()}; {size} plans {need / GiB:.1f} GiB"
    free, total = machine.device_free or 0, machine.device_total or 0
    skipped: list[str] = []
    for name in GPU_ORDER:
        p = PRESETS[name]
        if p.budget_bytes is not None and name != "minimal" and total < 0.9 * p.budget_bytes:
            skipped.append(f"{name} is for {p.budget_bytes / GiB:.0f} GB cards")
            continue
        try:
            need = planned_peak(p, config, pp, task, width, height, "cuda", effective_budget(p, machine))
        except BudgetError as exc:
            skipped.append(f"{name} needs {exc.min_budget_bytes / GiB:.1f} GiB")
            continue
        if need > free:
            skipped.append(f"{name} needs {need / GiB:.1f} GiB")
            continue
        if host_bytes_needed(p, config) > machine.ram_bytes:
            skipped.append(f"{name} needs more host RAM")
            continue
        why = f" ({skipped[0]})" if skipped else ""
        return p, f"preset {name}: {machine.describe()}; its plan for {size} peaks at {need / GiB:.1f} GiB{why}"
    raise InputError(f"no preset fits {size} on {machine.describe()} ({'; '.join(skipped[-2:])}); "
                     f"use a smaller size or --device cpu")


def check_fits(preset: Preset, config: OvisU1Config, pp: PreprocessorConfig, task: str, width: int, height: int,
               machine: Machine) -> int:
    """The planned peak of a user-chosen preset, or a one-line error naming what would fit."""
    from offload import BudgetError

    budget = effective_budget(preset, machine)
    cap = machine.device_free if machine.device_type != "cpu" else None
    try:
        need = planned_peak(preset, config, pp, task, width, height, machine.device_type
                            if machine.device_type in preset.devices else preset.devices[0], budget)
    except BudgetError as exc:
        need = exc.min_budget_bytes
    limit = budget if budget is not None else cap
    if limit is not None and need > limit:
        side = largest_fitting_size(preset, config, pp, task, limit, machine.device_type)
        hint = f"the largest square size that fits is {side}x{side}" if side else "no size fits"
        raise InputError(f"preset {preset.name} needs {format_bytes(need)} for {task} {width}x{height} but has "
                         f"{format_bytes(limit)}; {hint}, or choose a smaller preset")
    return need


def largest_fitting_size(preset: Preset, config: OvisU1Config, pp: PreprocessorConfig, task: str,
                         budget: int, device_type: str = "cuda") -> int | None:
    """Largest square side (multiple of 64) whose plan fits `budget` with this preset."""
    from offload import BudgetError

    best = None
    for side in range(256, 4096 + 1, 64):
        try:
            if planned_peak(preset, config, pp, task, side, side, device_type, budget) > budget:
                break
        except BudgetError:
            break
        best = side
    return best
