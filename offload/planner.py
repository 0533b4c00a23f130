"""Budget planner: which units stay resident, how deep to prefetch, whether batched CFG fits.

The model of the device peak, per phase p, is

    resident(p) + outer(p) + inner(p, 1 + depth) + activation(p)

where resident(p) sums the resident units used by p; outer(p) is the largest paged "outer"
unit of p (a component's rest, on the device while its blocks run); inner(p, k) sums the k
largest paged other units of p (the executor holds at most 1 + depth of them: the running one
and the prefetched ones), which is never more than largest x (1 + depth). Components not used by
p are not on the device during p. Planning is pure arithmetic, so it runs before any weight is
loaded and refuses impossible budgets up front.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Protocol, Sequence

from .errors import UserError


class UnitLike(Protocol):
    name: str
    nbytes: int
    phases: frozenset[str]
    uses: int
    outer: bool


@dataclass(frozen=True)
class UnitInfo:
    """The planner's view of a unit (an `offload.units.Unit` also satisfies `UnitLike`)."""

    name: str
    nbytes: int
    phases: frozenset[str]
    uses: int = 1
    outer: bool = False


class BudgetError(UserError, ValueError):
    """The budget cannot hold even the minimal plan (everything paged, no prefetch)."""

    def __init__(self, budget_bytes: int, min_budget_bytes: int, phase: str, what: str = "") -> None:
        self.budget_bytes = budget_bytes
        self.min_budget_bytes = min_budget_bytes
        self.phase = phase
        super().__init__(
            f"device budget {_mib(budget_bytes)} is too small{what}: the smallest budget that works is "
            f"{min_budget_bytes} bytes ({_mib(min_budget_bytes)}, set by phase {phase!r})"
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclass
class Plan:
    budget_bytes: int
    planned_peak_bytes: int
    phase_peaks: dict[str, int]
    phase_weight_peaks: dict[str, int]
    activation_bytes: dict[str, int]
    resident_weight_bytes: int
    resident_units: list[str]
    paged_units: list[str]
    prefetch_depth: int
    batch_cfg: bool
    min_budget_bytes: int
    paged_bytes_per_generation: int
    unit_bytes: dict[str, int] = field(default_factory=dict)
    reserve_bytes: int = 0  # held back beside the plan (the caller's caches); planned_peak + reserve <= budget

    def is_resident(self, unit: str) -> bool:
        return unit in self._resident_set

    @property
    def _resident_set(self) -> frozenset[str]:
        return frozenset(self.resident_units)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)


def _infos(units: Iterable[UnitLike]) -> list[UnitInfo]:
    out = [UnitInfo(u.name, int(u.nbytes), frozenset(u.phases), int(getattr(u, "uses", 1)), bool(getattr(u, "outer", False)))
           for u in units]
    names = [u.name for u in out]
    if len(set(names)) != len(names):
        raise ValueError("unit names must be unique")
    return out


def _phases(units: Sequence[UnitInfo], activation: Mapping[str, int]) -> list[str]:
    seen: dict[str, None] = {}
    for u in units:
        for p in sorted(u.phases):
            seen.setdefault(p, None)
    for p in activation:
        seen.setdefault(p, None)
    return list(seen)


def phase_weight_peaks(units: Sequence[UnitInfo], resident: frozenset[str], depth: int,
                       phases: Sequence[str]) -> dict[str, int]:
    """Weight part of each phase's peak under the model in the module docstring."""
    out: dict[str, int] = {}
    for p in phases:
        used = [u for u in units if p in u.phases]
        res = sum(u.nbytes for u in used if u.name in resident)
        outer = max((u.nbytes for u in used if u.outer and u.name not in resident), default=0)
        inner = sorted((u.nbytes for u in used if not u.outer and u.name not in resident), reverse=True)
        out[p] = res + outer + sum(inner[: 1 + depth])
    return out


def _peaks(units: Sequence[UnitInfo], resident: frozenset[str], depth: int,
           activation: Mapping[str, int]) -> dict[str, int]:
    phases = _phases(units, activation)
    weights = phase_weight_peaks(units, resident, depth, phases)
    return {p: weights[p] + int(activation.get(p, 0)) for p in phases}


def min_budget_bytes(units: Iterable[UnitLike], activation_bytes: Mapping[str, int]) -> int:
    """Smallest budget any plan fits in: everything paged, no prefetch."""
    infos = _infos(units)
    peaks = _peaks(infos, frozenset(), 0, activation_bytes)
    return max(peaks.values(), default=0)


def _argmax(peaks: Mapping[str, int]) -> str:
    return max(peaks, key=lambda p: peaks[p]) if peaks else "-"


def _greedy(units: Sequence[UnitInfo], budget: int, depth: int, activation: Mapping[str, int]) -> frozenset[str]:
    """Keep units resident, most-used (then largest) first, while every phase still fits."""
    if max(_peaks(units, frozenset(u.name for u in units), 0, activation).values(), default=0) <= budget:
        return frozenset(u.name for u in units)
    resident: frozenset[str] = frozenset()
    for u in sorted(units, key=lambda u: (-u.uses, -u.nbytes, u.name)):
        trial = resident | {u.name}
        if max(_peaks(units, trial, depth, activation).values()) <= budget:
            resident = trial
    return resident


def _transfer_cost(units: Sequence[UnitInfo], resident: frozenset[str]) -> int:
    return sum(u.nbytes * u.uses for u in units if u.name not in resident)


def _plan_for(units: Sequence[UnitInfo], budget: int, activation: Mapping[str, int],
              max_depth: int) -> tuple[frozenset[str], int] | None:
    for depth in sorted({min(1, max_depth), 0}, reverse=True):
        if max(_peaks(units, frozenset(), depth, activation).values(), default=0) > budget:
            continue
        resident = _greedy(units, budget, depth, activation)
        n_paged = sum(1 for u in units if u.name not in resident and not u.outer)
        while depth < max_depth and depth + 1 < n_paged and \
                max(_peaks(units, resident, depth + 1, activation).values()) <= budget:
            depth += 1
        return resident, min(depth, max(n_paged - 1, 0))
    return None


def plan(budget_bytes: int, units: Iterable[UnitLike], activation_bytes: Mapping[str, int], *,
         max_prefetch_depth: int = 1, batch_activation_bytes: Mapping[str, int] | None = None,
         batch_cfg: bool | None = None, reserve_bytes: int = 0) -> Plan:
    """Plan residency, prefetch depth and batched CFG for `budget_bytes` of device memory.

    `activation_bytes` is the caller's activation estimate per phase; `batch_activation_bytes`
    overrides it for the phases whose CFG passes would be batched. `batch_cfg=None` batches only
    when that pages no more bytes than the unbatched plan; True forces it (or refuses), False
    never batches. `reserve_bytes` is held back from the budget (allocator slack, CUDA context).
    """
    if max_prefetch_depth < 0:
        raise ValueError(f"max_prefetch_depth must be >= 0, got {max_prefetch_depth}")
    infos = _infos(units)
    budget = int(budget_bytes) - int(reserve_bytes)
    act = {k: int(v) for k, v in activation_bytes.items()}
    act_batch = {**act, **{k: int(v) for k, v in (batch_activation_bytes or {}).items()}}
    if batch_cfg and batch_activation_bytes is None:
        raise ValueError("batch_cfg=True needs batch_activation_bytes")

    base_peaks = _peaks(infos, frozenset(), 0, act)
    minimum = max(base_peaks.values(), default=0) + int(reserve_bytes)
    if minimum > budget_bytes:
        raise BudgetError(int(budget_bytes), minimum, _argmax(base_peaks))

    unbatched = _plan_for(infos, budget, act, max_prefetch_depth)
    assert unbatched is not None  # the minimal plan fits
    choice, use_batch = unbatched, False
    if batch_activation_bytes is not None and batch_cfg is not False:
        batched = _plan_for(infos, budget, act_batch, max_prefetch_depth)
        if batched is None and batch_cfg:
            peaks = _peaks(infos, frozenset(), 0, act_batch)
            raise BudgetError(int(budget_bytes), max(peaks.values()) + int(reserve_bytes), _argmax(peaks),
                              " for batched CFG")
        if batched is not None and (batch_cfg or _transfer_cost(infos, batched[0]) <= _transfer_cost(infos, unbatched[0])):
            choice, use_batch = batched, True

    resident, depth = choice
    used_act = act_batch if use_batch else act
    phases = _phases(infos, used_act)
    weights = phase_weight_peaks(infos, resident, depth, phases)
    peaks = {p: weights[p] + used_act.get(p, 0) for p in phases}
    return Plan(
        budget_bytes=int(budget_bytes),
        planned_peak_bytes=max(peaks.values(), default=0),
        phase_peaks=peaks,
        phase_weight_peaks=weights,
        activation_bytes={p: used_act.get(p, 0) for p in phases},
        resident_weight_bytes=sum(u.nbytes for u in infos if u.name in resident),
        resident_units=[u.name for u in infos if u.name in resident],
        paged_units=[u.name for u in infos if u.name not in resident],
        prefetch_depth=depth,
        batch_cfg=use_batch,
        min_budget_bytes=minimum,
        paged_bytes_per_generation=_transfer_cost(infos, resident),
        unit_bytes={u.name: u.nbytes for u in infos},
        reserve_bytes=int(reserve_bytes),
    )
