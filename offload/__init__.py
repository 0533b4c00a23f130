"""Low-VRAM offloading for any `nn.Module`: units, a budget planner, a residency ledger and hooks.

Wiring: `build_units` / `units_for` -> `plan(budget, units, activation)` -> `attach_offload(units,
plan, device)` -> `offloader.enter_phase(name)` before each phase -> `offloader.remove()`.
"""

from .accounting import module_nbytes, tensors_nbytes
from .hooks import SequentialOffloader, attach_offload
from .ledger import ResidencyLedger
from .planner import BudgetError, Plan, UnitInfo, min_budget_bytes, phase_weight_peaks, plan
from .tensors import OffloadedTensorError
from .units import Unit, UnitSpec, build_units, outermost_module_lists, specs_for, units_for

__all__ = [
    "BudgetError",
    "OffloadedTensorError",
    "Plan",
    "ResidencyLedger",
    "SequentialOffloader",
    "Unit",
    "UnitInfo",
    "UnitSpec",
    "attach_offload",
    "build_units",
    "min_budget_bytes",
    "module_nbytes",
    "outermost_module_lists",
    "phase_weight_peaks",
    "plan",
    "specs_for",
    "tensors_nbytes",
    "units_for",
]
