"""Classifier-free guidance as the sampler sees it: scales, the interval of t where guidance applies, and
how many model evaluations that costs (the number of CFG passes is the caller's: 2 for t2i, 3 for edit)."""

from __future__ import annotations

from dataclasses import dataclass

from .schedules import make_timesteps, reference_schedule, time_shift_mu
from .solvers import nfe


@dataclass(frozen=True)
class Guidance:
    """CFG scales, and optionally the interval of t in which guidance applies (elsewhere: cond only)."""

    txt_cfg: float
    img_cfg: float = 0.0
    interval: tuple[float, float] | None = None

    def active(self, t: float) -> bool:
        return self.interval is None or self.interval[0] <= t <= self.interval[1]


def guided_nfe(passes: int, solver: str, spacing: str, steps: int, interval: tuple[float, float] | None,
               tokens: int = 4096) -> int:
    """Model evaluations per image: the conditional pass at every solver evaluation, the other `passes - 1`
    only where guidance is on (counted at the times the solver visits, `tokens` sets the shift)."""
    evaluations = nfe(solver, steps)
    if interval is None:
        return passes * evaluations
    if spacing == "linear":
        ts = reference_schedule(steps, tokens)
    else:
        ts = list(make_timesteps(steps, spacing, time_shift_mu(tokens)))
    visited = ts[:-1]
    guided = sum(1 for t in visited if interval[0] <= t <= interval[1])
    return evaluations + (passes - 1) * round(guided * evaluations / len(visited))
