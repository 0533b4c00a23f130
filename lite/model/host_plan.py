"""How much host memory a CPU run holds, per phase, counted as the kernel counts it: anonymous + mapped.

On a CPU nothing pages through a device, but not every weight costs the same kind of memory:

* **anonymous**: weights the load converted (quantized layers, a dtype cast such as the fp32 VAE), the
  runtime's own heap, and the activations. They stay resident for the whole run.
* **mapped**: weights kept in their stored dtype stay views of the memory-mapped shards. Only the pages a
  phase reads are resident: the loader drops what it read, and `lite.runtime.host_pages` drops, at each
  phase change, the units the new phase does not use (the same `unit_specs` table the planner uses).

So a phase holds: runtime + converted weights + the stored-dtype weights of its own units + its activations.
The `RUNTIME_*` constants are the interpreter with torch, transformers and our modules imported, measured
with `scripts/bench_memory.py --runtime` (docs/BENCHMARKS.md, "Host memory on CPU").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from quant.backends.base import element_size

from lite.model.config import OvisU1Config, PreprocessorConfig
from lite.model.memory_profile import Workload, activation_bytes, ovis_units
from lite.model.precision import QuantPolicy
from lite.model.quantize import plan_model
from lite.model.sizes import module_bytes

GiB = 1 << 30
#: Resident runtime before any weight: anonymous (interpreter, torch's heap, thread stacks) and mapped
#: (the shared libraries' pages: libtorch, oneDNN, ...), measured on the development machine, rounded up.
RUNTIME_ANON_BYTES = 448 << 20
RUNTIME_MAPPED_BYTES = 448 << 20
#: What the loader may hold at once beyond the converted weights: the mapped pages read since its last
#: release (`lite.model.checkpoint.RELEASE_EVERY_BYTES`) plus the largest tensor's conversion transients.
LOAD_WINDOW_BYTES = 1 << 30
PHASES = ("conditions", "denoise", "decode")


@dataclass
class HostPhase:
    anon: int
    mapped: int

    @property
    def total(self) -> int:
        return self.anon + self.mapped


@dataclass
class HostPlan:
    """Per phase (and the load): anonymous and mapped bytes; the peak is the largest total."""

    phases: dict[str, HostPhase] = field(default_factory=dict)
    weights_anon: int = 0
    weights_mapped: int = 0

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: self.phases[p].total)

    @property
    def peak(self) -> HostPhase:
        return self.phases[self.peak_phase]

    def describe(self) -> str:
        """One line: the peak and its two parts, named."""
        p = self.peak
        return (f"host peak {p.total / GiB:.2f} GiB in {self.peak_phase} (anonymous {p.anon / GiB:.2f} + mapped "
                f"{p.mapped / GiB:.2f})")


def _slot_bytes(model: nn.Module, policy: QuantPolicy, stored: Callable[[str], torch.dtype],
                sizes: dict[str, int]) -> dict[tuple[int, str], tuple[int, int]]:
    """(id(module), tensor name) -> (anonymous, mapped) bytes of that tensor once loaded under `policy`."""
    quantized = plan_model(model, policy)
    out: dict[tuple[int, str], tuple[int, int]] = {}
    for mname, module in model.named_modules():
        if mname in quantized:  # the whole quantized layout is new memory; owned by its weight slot
            out[(id(module), "weight")] = (sizes.get(mname, 0), 0)
            out[(id(module), "bias")] = (0, 0)
            continue
        for leaf, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            name = f"{mname}.{leaf}" if mname else leaf
            keeps = t.is_floating_point() and policy.dtype_for(name) == stored(name)
            dtype = policy.dtype_for(name) if t.is_floating_point() else t.dtype
            nbytes = t.numel() * element_size(dtype)
            is_buffer = leaf in module._buffers
            out[(id(module), leaf)] = (0, nbytes) if keeps and not is_buffer else (nbytes, 0)
    return out


def host_plan(model: nn.Module, config: OvisU1Config, pp: PreprocessorConfig, wl: Workload, policy: QuantPolicy,
              stored: Callable[[str], torch.dtype] = lambda _name: torch.bfloat16,
              sizes: dict[str, int] | None = None) -> HostPlan:
    """The host memory of one CPU workload, per phase (`model` may be a meta model or the skeleton).

    `stored` gives each tensor's dtype in the checkpoint (default bf16, the config's `torch_dtype`); `sizes`,
    the bytes each module owns under `policy` (`lite.model.sizes.module_bytes`) when the caller has them.
    """
    per_slot = _slot_bytes(model, policy, stored, sizes if sizes is not None else module_bytes(model, policy))
    units = ovis_units(model, wl)
    seen: set[int] = set()  # tensors, so a tied weight counts once
    anon_total, mapped_by_unit = 0, []
    for unit in units:
        mapped = 0
        for slot in unit.slots:
            tensor = slot.get()
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            anon, mapd = per_slot.get((id(slot.module), slot.name), (0, 0))
            anon_total += anon
            mapped += mapd
        mapped_by_unit.append((unit, mapped))
    act = activation_bytes(config, pp, wl)  # the decode as run on a CPU (memory_profile.decode_activation)
    plan = HostPlan(weights_anon=anon_total, weights_mapped=sum(m for _, m in mapped_by_unit))
    base_anon = RUNTIME_ANON_BYTES + anon_total
    plan.phases["load"] = HostPhase(base_anon, RUNTIME_MAPPED_BYTES + LOAD_WINDOW_BYTES)
    for phase in PHASES:
        if phase != "conditions" and not act.get(phase):
            continue  # understanding has no denoise or decode
        mapped = sum(m for u, m in mapped_by_unit if phase in u.phases)
        plan.phases[phase] = HostPhase(base_anon + act.get(phase, 0), RUNTIME_MAPPED_BYTES + mapped)
    return plan
