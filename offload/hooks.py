"""Execution: hooks that page units onto the execution device just in time.

One `PagingHook` per entry module, registered in the module's `HookRegistry` (`offload/registry.py`) as
`"offload"`, outermost (the weights must be in place before any other hook reads them); its exit half runs
even when the forward raises. Model code is never forked and other hooks compose. Hooks that change a paged
module's tensors into a layout paging cannot copy (`ModuleHook.changes_tensors`: oneDNN-packed weights) are
taken off by name when paging attaches and put back when it is removed. Three modes:

- account  (device "cpu"): nothing moves; the ledger records what would be resident.
- simulate (device "cpu", simulate=True): offloaded weights become loud placeholders and are
  re-materialised from the host copy on onload, so a missed onload fails instead of passing.
- device   (cuda / mps): page-locked host copies (CUDA), copies on a side stream with events,
  prefetch of the next units in execution order while the current one computes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .accounting import tensors_nbytes
from .ledger import ResidencyLedger
from .planner import Plan
from .registry import PAGING, ModuleHook, add_hook, hook_names, get_hook, remove_hook
from .tensors import copy_to, device_layout, is_wrapper_subclass, leaves, pinned_copy, placeholder_like, standard_to
from .units import Slot, Unit


@dataclass(eq=False)
class _UnitState:
    unit: Unit
    hosts: list[torch.Tensor]  # one host object per distinct tensor (tied slots share one)
    slots: list[list[Slot]]
    placeholders: list[torch.Tensor | None]
    originals: list[torch.Tensor | None]  # kept when the host copy *is* the original
    original_devices: list[torch.device]
    device_objs: list[torch.Tensor] | None = None
    event: Any = None
    inflight: int = 0
    active: bool = False
    loaded_at: int = 0
    hooked: list[nn.Module] = field(default_factory=list)


#: The name paging's hooks have in each module's registry.
HOOK_NAME = "offload"


class PagingHook(ModuleHook):
    """Onload a unit before its entry module runs; release it after its exit module returns (or raises)."""

    order = PAGING

    def __init__(self, enter: Any, leave: Any) -> None:
        self.enter, self.leave = enter, leave

    def forward(self, module: nn.Module, inner: Any, *args: Any, **kwargs: Any) -> Any:
        self.enter()
        try:
            return inner(*args, **kwargs)
        finally:
            self.leave()


class SequentialOffloader:
    """Pages `units` following `plan`; call `attach()` (or use `attach_offload`) and `enter_phase`."""

    def __init__(self, units: Sequence[Unit], plan: Plan, device: str | torch.device = "cpu", *,
                 simulate: bool = False, order: Sequence[str] | None = None, pin_memory: bool = True,
                 use_stream: bool | None = None, copy_on_onload: bool = True,
                 ledger: ResidencyLedger | None = None) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if simulate and self.device.type != "cpu":
            raise ValueError(f"simulate=True is a CPU test mode; execution device is {self.device}")
        if self.device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"unsupported execution device {self.device}; use cpu, cuda or mps")
        names = {u.name for u in units}
        planned = set(plan.resident_units) | set(plan.paged_units)
        if names != planned:
            raise ValueError(f"plan and units disagree: only in units {sorted(names - planned)}, "
                             f"only in plan {sorted(planned - names)}")
        self.units = list(units)
        self.plan = plan
        self.mode = "device" if self.device.type != "cpu" else ("simulate" if simulate else "account")
        self.ledger = ledger if ledger is not None else ResidencyLedger()
        self.copy_on_onload = copy_on_onload
        self.pin_memory = pin_memory and self.device.type == "cuda"
        self.use_stream = (self.device.type == "cuda") if use_stream is None else use_stream
        if self.use_stream and self.device.type != "cuda":
            raise ValueError(f"use_stream=True needs a CUDA execution device, got {self.device}")
        self._resident = frozenset(plan.resident_units)
        self._given_order = list(order) if order is not None else None
        self._orders: dict[str | None, list[str]] = {}
        self._order_sets: dict[str | None, set[str]] = {}
        self._complete: set[str | None] = set()
        self._phase: str | None = None
        self._states: dict[str, _UnitState] = {}
        self._tick = 0
        self._copy_stream: Any = None
        self._attached = False
        self._taken_off: list[tuple[nn.Module, str, ModuleHook]] = []

    # ----------------------------------------------------------------- lifecycle
    def attach(self) -> "SequentialOffloader":
        """Make host copies, drop device-side weights to placeholders and register the hooks."""
        if self._attached:
            raise RuntimeError("offloader is already attached")
        if self.use_stream:
            self._copy_stream = torch.cuda.Stream(self.device)
        self._take_off_tensor_hooks()
        for unit in self.units:
            self._states[unit.name] = self._prepare(unit)
        for st in self._states.values():
            for module in st.unit.entry_modules:
                add_hook(module, HOOK_NAME, PagingHook(self._make_pre(st), self._make_post(st, module)))
                st.hooked.append(module)
        self._attached = True
        return self

    def _take_off_tensor_hooks(self) -> None:
        """Paging copies plain tensors: hooks that changed a paged module's tensors go, by name, until `remove`."""
        modules = {id(s.module): s.module for unit in self.units for s in unit.slots}
        for module in modules.values():
            for name in hook_names(module):
                hook = get_hook(module, name)
                if hook is not None and hook.changes_tensors:
                    remove_hook(module, name)
                    self._taken_off.append((module, name, hook))

    def remove(self) -> None:
        """Remove the hooks and put every tensor back, on its original device."""
        if not self._attached:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for st in self._states.values():
            for module in st.hooked:
                remove_hook(module, HOOK_NAME)
            if st.device_objs is not None:
                self.ledger.remove(st.unit.name)
                st.device_objs = None
            for i, slots in enumerate(st.slots):
                restored = st.originals[i] if st.originals[i] is not None else self._restore(st.hosts[i], st.original_devices[i])
                for slot in slots:
                    slot.set(restored)
        self._states.clear()
        for module, name, hook in self._taken_off:  # back as they were, now that the plain tensors are
            add_hook(module, name, hook)
        self._taken_off.clear()
        self._copy_stream = None
        self._attached = False

    def __enter__(self) -> "SequentialOffloader":
        return self if self._attached else self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ----------------------------------------------------------------- public control
    def enter_phase(self, phase: str) -> None:
        """Free every unit the phase does not use, then load the phase's resident units."""
        self._phase = phase
        for st in self._states.values():
            st.inflight, st.active = 0, False
            if st.device_objs is not None and not self._resident_now(st.unit):
                self._release(st)
        self.ledger.set_phase(phase)
        for st in self._states.values():
            if st.device_objs is None and self._resident_now(st.unit):
                self._onload(st)

    def offload_all(self) -> None:
        """Release every unit (end of a generation): the device holds none of the managed weights."""
        for st in self._states.values():
            st.inflight, st.active = 0, False
            self._release(st)

    @property
    def phase(self) -> str | None:
        return self._phase

    def execution_order(self, phase: str | None = None) -> list[str]:
        """The given order, or the one learned from the first pass of `phase`."""
        return list(self._given_order) if self._given_order is not None else list(self._orders.get(phase, []))

    def on_device(self) -> list[str]:
        return [n for n, st in self._states.items() if st.device_objs is not None]

    # ----------------------------------------------------------------- preparation
    def _prepare(self, unit: Unit) -> _UnitState:
        by_id: dict[int, int] = {}
        hosts: list[torch.Tensor] = []
        slots: list[list[Slot]] = []
        for slot in unit.slots:
            obj = slot.get()
            if obj is None:
                continue
            if id(obj) not in by_id:
                by_id[id(obj)] = len(hosts)
                hosts.append(obj)
                slots.append([])
            slots[by_id[id(obj)]].append(slot)
        originals: list[torch.Tensor | None] = list(hosts)
        devices = [h.device for h in hosts]
        if self.mode == "device":
            hosts = [self._host_copy(h) for h in hosts]
            originals = [None] * len(hosts)
        placeholders: list[torch.Tensor | None] = [None] * len(hosts)
        if self.mode != "account":
            for i, (host, group) in enumerate(zip(hosts, slots)):
                placeholders[i] = placeholder_like(host, f"{unit.name}:{type(group[0].module).__name__}.{group[0].name}")
                for slot in group:
                    slot.set(placeholders[i])
        return _UnitState(unit, hosts, slots, placeholders, originals, devices)

    def _host_copy(self, obj: torch.Tensor) -> torch.Tensor:
        """Host copy in the execution device's packing, page-locked on CUDA (one copy per weight)."""
        obj = device_layout(obj, self.device)
        return pinned_copy(obj) if self.pin_memory else copy_to(obj, "cpu")

    def _restore(self, host: torch.Tensor, original: torch.device) -> torch.Tensor:
        if is_wrapper_subclass(host) and original.type != self.device.type:
            # The host copy is packed for the execution device: unpack through the tensor's own `.to`.
            return standard_to(copy_to(host, self.device), original)
        return host if host.device == original else copy_to(host, original)

    # ----------------------------------------------------------------- hooks
    def _make_pre(self, st: _UnitState):
        def pre_hook() -> None:
            start = not st.active
            if start:
                st.active = True
                self._note_order(st.unit.name)
            st.inflight += 1
            if st.device_objs is None:
                self._onload(st)
            self._wait(st)
            if start:
                self._prefetch_after(st)
        return pre_hook

    def _make_post(self, st: _UnitState, module: nn.Module):
        is_exit = module is st.unit.exit_module

        def post_hook() -> None:
            st.inflight = max(0, st.inflight - 1)
            if is_exit:
                st.active = False
                if st.inflight == 0 and not self._resident_now(st.unit):
                    self._release(st)
        return post_hook

    # ----------------------------------------------------------------- paging
    def _resident_now(self, unit: Unit) -> bool:
        if unit.name not in self._resident:
            return False
        if self._phase is None or self._phase in unit.phases:
            return True
        return False

    def _pool(self, st: _UnitState) -> list[_UnitState]:
        return [o for o in self._states.values() if o is not st and o.device_objs is not None
                and o.unit.outer == st.unit.outer and not self._resident_now(o.unit)]

    def _capacity(self, st: _UnitState) -> int:
        return 1 if st.unit.outer else 1 + self.plan.prefetch_depth

    def _make_room(self, st: _UnitState) -> None:
        if self._resident_now(st.unit):
            return
        pool = self._pool(st)
        while len(pool) >= self._capacity(st):
            idle = [o for o in pool if o.inflight == 0]
            if not idle:
                return  # nested use of several paged units: let it exceed; the ledger shows it
            victim = min(idle, key=lambda o: o.loaded_at)
            self._release(victim)
            pool.remove(victim)

    def _onload(self, st: _UnitState) -> None:
        if (self._phase is not None and self._phase not in st.unit.phases
                and not st.unit.extra.get("_warned_phase")):
            st.unit.extra["_warned_phase"] = True
            warnings.warn(f"unit {st.unit.name} (phases {sorted(st.unit.phases)}) ran in phase {self._phase!r}; "
                          f"it is paged there and the plan's peak for that phase does not include it",
                          stacklevel=3)
        self._make_room(st)
        if self.mode == "account":
            objs = list(st.hosts)
        elif self.mode == "simulate":
            objs = [copy_to(h, "cpu") if self.copy_on_onload else h for h in st.hosts]
        elif self._copy_stream is not None:
            with torch.cuda.stream(self._copy_stream):
                objs = [copy_to(h, self.device, non_blocking=True) for h in st.hosts]
                event = torch.cuda.Event()
                event.record(self._copy_stream)
            st.event = event
        else:
            objs = [copy_to(h, self.device, non_blocking=self.pin_memory) for h in st.hosts]
        if self.mode != "account":
            for obj, group in zip(objs, st.slots):
                for slot in group:
                    slot.set(obj)
        st.device_objs = objs
        self._tick += 1
        st.loaded_at = self._tick
        self.ledger.add(st.unit.name, tensors_nbytes(objs))

    def _wait(self, st: _UnitState) -> None:
        """Make the compute stream wait for the unit's copy and tell the allocator it uses the tensors."""
        if st.event is None:
            return
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(st.event)
        for obj in st.device_objs or []:
            for leaf in leaves(obj):
                leaf.record_stream(stream)
        st.event = None

    def _release(self, st: _UnitState) -> None:
        if st.device_objs is None:
            return
        if self.mode != "account":
            for ph, group in zip(st.placeholders, st.slots):
                for slot in group:
                    slot.set(ph)  # type: ignore[arg-type]
        st.device_objs = None
        st.event = None
        self.ledger.remove(st.unit.name)

    # ----------------------------------------------------------------- order and prefetch
    def _note_order(self, name: str) -> None:
        key = self._phase
        seen = self._order_sets.setdefault(key, set())
        if name in seen:
            self._complete.add(key)
        else:
            seen.add(name)
            self._orders.setdefault(key, []).append(name)

    def _prefetch_after(self, st: _UnitState) -> None:
        depth = self.plan.prefetch_depth
        if depth == 0:
            return
        if self._given_order is not None:
            order, complete = self._given_order, True
        else:
            order, complete = self._orders.get(self._phase, []), self._phase in self._complete
        try:
            i = order.index(st.unit.name)
        except ValueError:
            return
        upcoming = order[i + 1:] + (order[:i] if complete else [])
        targets = []
        for name in upcoming:
            other = self._states.get(name)
            if other is None or self._resident_now(other.unit):
                continue
            if self._phase is not None and self._phase not in other.unit.phases:
                continue
            targets.append(other)
            if len(targets) == depth:
                break
        for other in targets:
            if other.device_objs is not None:
                continue
            if len(self._pool(other)) >= self._capacity(other):
                break  # never evict for a prefetch: the slot holds a unit needed sooner
            self._onload(other)


def attach_offload(units: Sequence[Unit], plan: Plan, device: str | torch.device = "cpu", **kwargs: Any) -> SequentialOffloader:
    """Build a `SequentialOffloader` for `units` under `plan` and attach its hooks."""
    return SequentialOffloader(units, plan, device, **kwargs).attach()
