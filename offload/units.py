"""Units: the pieces of a model that the offloader pages as a whole.

A unit is a block, a group of consecutive blocks of an `nn.ModuleList`, or everything of a
component that is not in such a group (the "rest": embedders, norms, heads). Grouping trades
transfer count against the peak, so it is chosen per component with a `UnitSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from .accounting import tensors_nbytes
from .tensors import leaves

Granularity = str | int  # "component", "block", or a group size


@dataclass(frozen=True)
class UnitSpec:
    """How to cut one component: `path` names a ModuleList inside it; None means the whole component."""

    component: str
    path: str | None = None
    group_size: int = 1
    phases: tuple[str, ...] = ("default",)
    uses: int = 1  # executions per generation; residency favours frequently used units


@dataclass(frozen=True)
class Slot:
    """One tensor attribute (`module._parameters[name]` or `module._buffers[name]`) owned by a unit."""

    module: nn.Module
    name: str
    is_param: bool

    def get(self) -> torch.Tensor | None:
        table = self.module._parameters if self.is_param else self.module._buffers
        return table.get(self.name)

    def set(self, value: torch.Tensor) -> None:
        table = self.module._parameters if self.is_param else self.module._buffers
        table[self.name] = value  # type: ignore[assignment]


@dataclass(eq=False)
class Unit:
    """A pageable set of tensor slots plus the modules whose forwards need them."""

    name: str
    component: str
    slots: tuple[Slot, ...]
    entry_modules: tuple[nn.Module, ...]  # a forward of any of these needs the unit on the device
    exit_module: nn.Module  # the unit may be released once this module's forward returns
    nbytes: int
    phases: frozenset[str]
    uses: int = 1
    outer: bool = False  # encloses other units of its component (its forward spans theirs)
    extra: dict[str, object] = field(default_factory=dict)


def _submodules(module: nn.Module) -> list[nn.Module]:
    """`list(module.modules())` (pre-order, each module once) without building the qualified names:
    planning cuts the same skeleton into units for every preset and task, and `modules()` was most of it."""
    out: list[nn.Module] = []
    seen: set[int] = set()
    stack = [module]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        stack.extend(reversed([c for c in m._modules.values() if c is not None]))
    return out


def _owned_slots(module: nn.Module) -> list[Slot]:
    out: list[Slot] = []
    for m in _submodules(module):
        out += [Slot(m, n, True) for n, p in m._parameters.items() if p is not None]
        out += [Slot(m, n, False) for n, b in m._buffers.items() if b is not None]
    return out


def _slot_key(slot: Slot) -> tuple[int, str, bool]:
    return (id(slot.module), slot.name, slot.is_param)


def _make_unit(name: str, component: str, slots: list[Slot], entry: Sequence[nn.Module], exit_module: nn.Module,
               spec: UnitSpec, outer: bool) -> Unit:
    tensors = [t for s in slots if (t := s.get()) is not None]
    return Unit(
        name=name, component=component, slots=tuple(slots), entry_modules=tuple(entry), exit_module=exit_module,
        nbytes=tensors_nbytes(tensors), phases=frozenset(spec.phases), uses=spec.uses, outer=outer,
    )


def _component_units(component: str, root: nn.Module, specs: Sequence[UnitSpec]) -> list[Unit]:
    units: list[Unit] = []
    claimed: set[tuple[int, str, bool]] = set()
    for spec in specs:
        if spec.path is None:
            continue
        if spec.group_size < 1:
            raise ValueError(f"group_size must be >= 1 for {component}.{spec.path}, got {spec.group_size}")
        blocks = root.get_submodule(spec.path)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise TypeError(f"{component}.{spec.path} is a {type(blocks).__name__}, not a ModuleList/Sequential")
        children = list(blocks)
        for start in range(0, len(children), spec.group_size):
            group = children[start:start + spec.group_size]
            end = start + len(group) - 1
            label = f"{component}.{spec.path}.{start}" if len(group) == 1 else f"{component}.{spec.path}.{start}-{end}"
            slots = [s for b in group for s in _owned_slots(b) if _slot_key(s) not in claimed]
            claimed.update(_slot_key(s) for s in slots)
            units.append(_make_unit(label, component, slots, group, group[-1], spec, outer=False))
    rest = [s for s in _owned_slots(root) if _slot_key(s) not in claimed]
    if rest:
        rest_spec = next((s for s in specs if s.path is None), specs[0])
        owners: dict[int, nn.Module] = {id(root): root}
        for s in rest:
            owners.setdefault(id(s.module), s.module)
        has_blocks = bool(units)
        label = f"{component}.rest" if has_blocks else component
        units.append(_make_unit(label, component, rest, list(owners.values()), root, rest_spec, outer=has_blocks))
    return units


def _check_disjoint(units: Sequence[Unit]) -> None:
    """Tied tensors split across units would be paged twice and untied on the device: refuse them."""
    owner: dict[int, str] = {}
    for unit in units:
        seen_here: set[int] = set()
        for slot in unit.slots:
            t = slot.get()
            if t is None:
                continue
            for leaf in leaves(t):
                # meta and oneDNN-blocked tensors have no storage to compare (the latter are never tied)
                key = id(leaf) if leaf.device.type == "meta" or leaf.is_mkldnn else leaf.data_ptr()
                if key in seen_here or leaf.numel() == 0:
                    continue
                seen_here.add(key)
                if key in owner and owner[key] != unit.name:
                    raise ValueError(f"a tensor is shared by units {owner[key]} and {unit.name}; put both in one unit")
                owner[key] = unit.name


def build_units(components: Mapping[str, nn.Module], specs: Iterable[UnitSpec]) -> list[Unit]:
    """Cut `components` into units following `specs` (several specs may target one component)."""
    by_component: dict[str, list[UnitSpec]] = {}
    for spec in specs:
        if spec.component not in components:
            raise KeyError(f"UnitSpec names component {spec.component!r}, not in {sorted(components)}")
        by_component.setdefault(spec.component, []).append(spec)
    units: list[Unit] = []
    for component, comp_specs in by_component.items():
        units += _component_units(component, components[component], comp_specs)
    _check_disjoint(units)
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate unit names in {names}")
    return units


def outermost_module_lists(module: nn.Module) -> list[str]:
    """Paths of ModuleLists that are not inside another ModuleList (the block stacks)."""
    found: list[str] = []
    for path, sub in module.named_modules():
        if isinstance(sub, nn.ModuleList) and path and not any(path.startswith(p + ".") for p in found):
            found.append(path)
    return found


def specs_for(module: nn.Module, name: str, granularity: Granularity = "block",
              phases: Sequence[str] = ("default",), uses: int = 1) -> list[UnitSpec]:
    """Specs for one component: "component" (one unit), "block" (one per block) or an int group size."""
    if granularity == "component":
        return [UnitSpec(name, None, 1, tuple(phases), uses)]
    if granularity == "block":
        size = 1
    elif isinstance(granularity, int) and not isinstance(granularity, bool) and granularity >= 1:
        size = granularity
    else:
        raise ValueError(f"granularity must be 'component', 'block' or a positive int, got {granularity!r}")
    paths = outermost_module_lists(module)
    if not paths:
        return [UnitSpec(name, None, 1, tuple(phases), uses)]
    return [UnitSpec(name, p, size, tuple(phases), uses) for p in paths] + [UnitSpec(name, None, 1, tuple(phases), uses)]


def units_for(module: nn.Module, name: str, granularity: Granularity = "block",
              phases: Sequence[str] = ("default",), uses: int = 1) -> list[Unit]:
    """Units for one component at a given granularity (see `specs_for`)."""
    return build_units({name: module}, specs_for(module, name, granularity, phases, uses))
