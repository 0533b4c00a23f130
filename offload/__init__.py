"""Low-VRAM offloading for any `nn.Module`: units, a budget planner, a residency ledger and hooks.

Wiring: `build_units` / `units_for` -> `plan(budget, units, activation)` -> `attach_offload(units,
plan, device)` -> `offloader.enter_phase(name)` before each phase -> `offloader.remove()`.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .accounting import module_nbytes, tensors_nbytes
    from .hooks import SequentialOffloader, attach_offload
    from .ledger import ResidencyLedger
    from .planner import BudgetError, Plan, UnitInfo, min_budget_bytes, phase_weight_peaks, plan
    from .tensors import OffloadedTensorError
    from .units import Unit, UnitSpec, build_units, outermost_module_lists, specs_for, units_for

#: name -> submodule; imported on first use, so `import offload.errors` (every early one-line error) stays
#: free of torch.
_EXPORTS = {
    "module_nbytes": "accounting", "tensors_nbytes": "accounting", "SequentialOffloader": "hooks",
    "attach_offload": "hooks", "ResidencyLedger": "ledger", "BudgetError": "planner", "Plan": "planner",
    "UnitInfo": "planner", "min_budget_bytes": "planner", "phase_weight_peaks": "planner", "plan": "planner",
    "OffloadedTensorError": "tensors", "Unit": "units", "UnitSpec": "units", "build_units": "units",
    "outermost_module_lists": "units", "specs_for": "units", "units_for": "units",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'offload' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


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
