"""Applying a CPU plan to the loaded model: fp32 compute over bf16 storage, packed Linears, the one-row kernel.

Each is a named hook in the modules' registries (`offload/registry.py`), composed in a fixed order whatever the
order they are installed in, and `CpuHooks.remove()` takes every one off again (the model is then bitwise the
plain one). Paging takes packing off the layers it pages by itself (`offload/hooks.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from offload.registry import HookedLayers

from lite.model.architecture import OVIS_U1
from lite.runtime.cpu.compute import Fp32Compute, use_fp32_compute
from lite.runtime.cpu.plan import CpuPlan
from lite.runtime.cpu.prepack import HOOK_NAME as PACKED_HOOK, use_packed_linears
from lite.runtime.cpu.row_gemv import HOOK_NAME as ROW_GEMV_HOOK, use_row_gemv


def runs_on_one_row(component: str, name: str) -> bool:
    """Whether a Linear (path relative to its component) runs on one row: the Yak's adaLN modulation, its
    time/vector/text embedders and final layer (the Linears the quantizing presets keep in bf16)."""
    return component == "yak" and any(fnmatchcase(name, p) for p in OVIS_U1.yak_modulation + OVIS_U1.yak_keep_bf16)


@dataclass
class CpuHooks:
    """What `install_cpu_plan` hooked, by kind, so it can be reported and removed."""

    plan: CpuPlan
    compute_dtype: torch.dtype | None = None  # set when compute differs from the stored weights
    fp32: Fp32Compute | None = None
    packed: HookedLayers = field(default_factory=lambda: HookedLayers(PACKED_HOOK))
    row_gemv: HookedLayers = field(default_factory=lambda: HookedLayers(ROW_GEMV_HOOK))

    @property
    def packed_layers(self) -> int:
        return len(self.packed.layers)

    def plan_dict(self) -> dict[str, Any]:
        """The plan with how many Linears this model runs packed (`cpu_plan` in --json and /health)."""
        return self.plan.to_dict(self.packed_layers)

    def remove(self) -> None:
        if self.fp32 is not None:
            self.fp32.remove()
        self.packed.remove()
        self.row_gemv.remove()
        self.fp32, self.compute_dtype = None, None


def install_cpu_plan(model: nn.Module, plan: CpuPlan, auto_dtype: bool = True) -> CpuHooks:
    """Hook `model` (an Ovis-U1, weights on the CPU) as `plan` says.

    `auto_dtype`: the user left the dtype to the runtime, so bf16 storage computes in fp32 where the plan says
    (an explicit dtype is run as asked). Packing applies to the plan's components (not their one-row layers)
    where compute stays bf16; the one-row kernel to every dense bf16/fp16 Linear."""
    hooks = CpuHooks(plan)
    stored = model.visual_generator.backbone.img_in.weight.dtype
    if auto_dtype and plan.compute_dtype == torch.float32 and stored != torch.float32:
        hooks.compute_dtype, hooks.fp32 = torch.float32, use_fp32_compute(model)
    if hooks.fp32 is None:
        for component, root in model.architecture.component_modules(model).items():
            if component in plan.packed_components:
                skip = (lambda name, c=component: runs_on_one_row(c, name))
                hooks.packed.layers += use_packed_linears(root, skip, native=plan.native_bf16).layers
    hooks.row_gemv = use_row_gemv(model, kernel=plan.one_row_kernel.value)
    return hooks


__all__ = ["CpuHooks", "install_cpu_plan", "runs_on_one_row"]
