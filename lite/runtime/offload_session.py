"""Paging a loaded model through the device inside a budget, per task: enable, prepare, retry on OOM.

The planner and hooks are model-agnostic (`offload/`); this session knows the Ovis workload of each
call, re-plans only when the workload changes, and retries a device out-of-memory once with a plan that
fits what is really free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from offload import BudgetError, Plan, SequentialOffloader, attach_offload, module_nbytes

from lite.errors import InputError
from lite.memory import format_bytes
from lite.model.config import PreprocessorConfig
from lite.model.memory_profile import Workload
from lite.model.modeling_ovis_u1 import OvisU1
from lite.runtime.caches import DEVICE_SHARE
from lite.runtime.planning import plan_workload

OOM_RETRY_FACTOR = 0.75
T = TypeVar("T")


@dataclass
class OffloadSettings:
    """Page weights through the device inside `budget_bytes` (see `offload/`)."""

    budget_bytes: int
    prefetch_depth: int = 1
    simulate: bool = False  # CPU test mode: offloaded weights become loud placeholders


class OffloadSession:
    """The pipeline's paging state: the settings, the current plan and its hooks."""

    def __init__(self, model: OvisU1, preprocessor: PreprocessorConfig, device: torch.device,
                 notify: Callable[[str], None], reach: Callable[[], int] = lambda: 0,
                 release: Callable[[], int] = lambda: 0, limit: Callable[[int], int] = lambda n: 0) -> None:
        self.model = model
        # the pipeline's caches live on the device beside the plan: `reach()` is the most they can hold (their
        # budget; a plan reserves it, so no put during a run can pass what was planned), `limit(n)` bounds them
        # (to `DEVICE_SHARE` of the budget when paging starts, to what the smallest plan leaves when the share
        # does not fit) -> bytes evicted, `release()` drops them (first, on an out-of-memory) -> bytes freed
        self.reach, self.release, self.limit = reach, release, limit
        self.pp = preprocessor
        self.device = device
        self.notify = notify
        self.settings: OffloadSettings | None = None
        self.offloader: SequentialOffloader | None = None
        self.plan: Plan | None = None
        self._key: tuple[object, ...] | None = None

    def enable(self, budget_bytes: int, prefetch_depth: int = 1, simulate: bool = False) -> None:
        """Plan and page the weights inside `budget_bytes` of device memory, per task and size.

        The weights must be on the host (CPU); `device` is where compute runs. On CPU the
        offloader only accounts (or, with `simulate`, really drops and restores weights).
        """
        self.disable()
        self.settings = OffloadSettings(int(budget_bytes), prefetch_depth, simulate)
        self.limit(int(DEVICE_SHARE * budget_bytes))
        if self.device.type == "cuda":
            # Paging frees and reallocates units of different sizes every pass; with the default
            # caching allocator that fragmentation (64-140 MiB, measured on an H100) overflowed
            # 1-2 GB cards. Expandable segments remove it (docs/offload.md).
            try:
                torch.cuda.memory._set_allocator_settings("expandable_segments:True")
            except (AttributeError, RuntimeError):
                pass

    def disable(self) -> None:
        if self.offloader is not None:
            self.offloader.remove()
        self.settings = self.offloader = self.plan = self._key = None

    def enter_phase(self, name: str) -> None:
        if self.offloader is not None:
            self.offloader.enter_phase(name)

    def plan_for(self, wl: Workload, budget_bytes: int | None = None) -> tuple[list, Plan]:
        """Units and plan for a workload on this model (sizes are the real, possibly quantized, bytes)."""
        budget = budget_bytes if budget_bytes is not None else (self.settings.budget_bytes if self.settings else None)
        depth = self.settings.prefetch_depth if self.settings else 1
        reserve = self.reach() if budget is not None else 0
        try:
            return plan_workload(self.model, self.model.config, self.pp, wl, budget, depth, reserve_bytes=reserve)
        except BudgetError as exc:
            if not reserve:
                raise
            room = max(budget - (exc.min_budget_bytes - reserve), 0)  # what the smallest plan leaves free
        evicted = self.limit(room)
        if evicted:  # a shrink that drops nothing (empty caches, an out-of-memory retry's) is not news
            self.notify(f"the caches' device budget shrinks to {format_bytes(self.reach())} to fit a "
                        f"{format_bytes(budget)} plan (evicted {format_bytes(evicted)})")
        return plan_workload(self.model, self.model.config, self.pp, wl, budget, depth, reserve_bytes=self.reach())

    def prepare(self, wl: Workload) -> None:
        """Attach the plan for this workload (kept while the workload stays the same)."""
        if self.settings is None:
            return
        key = (wl.task, wl.output_size if wl.task != "understand" else None, wl.model_evaluations,
               self.settings.budget_bytes, self.reach())
        if self.offloader is not None and key == self._key:
            return
        if self.offloader is not None:
            self.offloader.remove()
            self.offloader = None
        units, plan = self.plan_for(wl)
        self.offloader = attach_offload(units, plan, self.device, simulate=self.settings.simulate)
        self.plan, self._key = plan, key

    def run(self, wl: Workload, task: Callable[[], T]) -> T:
        """Run a task; on a device OOM, retry once with a plan that fits what is really free."""
        self.prepare(wl)
        try:
            return task()
        except torch.OutOfMemoryError:
            pass
        freed = self.release()  # the caches go first: they are a convenience, the answer is not
        dropped = f"dropped {format_bytes(freed)} of caches; " if freed else ""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        failed = self._failed_plan_bytes()
        budget = self._retry_budget(wl, failed)
        self.notify(f"out of device memory with a {format_bytes(failed)} plan; {dropped}retrying once "
                    f"with a {format_bytes(budget)} plan")
        settings = self.settings or OffloadSettings(budget)
        self.enable(budget, settings.prefetch_depth, settings.simulate)
        self.prepare(wl)
        try:
            return task()
        except torch.OutOfMemoryError:
            raise InputError(f"out of device memory even with a {format_bytes(budget)} plan; "
                             f"choose a smaller preset or resolution") from None

    def _failed_plan_bytes(self) -> int:
        """What the failed run planned to use: its plan's peak, or every weight when nothing paged."""
        if self.plan is not None:
            return int(self.plan.planned_peak_bytes)
        return module_nbytes(self.model)

    def _retry_budget(self, wl: Workload, failed: int) -> int:
        """0.75x of the failed plan, capped by the device's real free memory, never below the minimum."""
        budget = int(failed * OOM_RETRY_FACTOR)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = min(budget, int(free))
        depth = self.settings.prefetch_depth if self.settings else 1
        try:  # the weights' minimum alone: the caches shrink to what the retry's plan leaves them
            minimum = plan_workload(self.model, self.model.config, self.pp, wl, max(budget, 1), depth)[1].min_budget_bytes
        except BudgetError as exc:
            minimum = exc.min_budget_bytes
        return max(budget, int(minimum))
