"""Flow-matching sampling for rectified-flow models (Ovis-U1's Yak and any other).

Model-agnostic: depends only on torch.  A model is a callable
``velocity(x, t) -> v`` with t a Python float in [0, 1] (t = 1 noise, t = 0
data) and ``dx/dt = v``; CFG, caching etc. live inside that callable.

    from lite.sampling import sample, time_shift_mu
    x0 = sample(velocity, noise, steps=50)                                  # reference: Euler, linear
    x0 = sample(velocity, noise, steps=50, shift_mu=time_shift_mu(4096))    # + Ovis-U1's μ shift
    x0 = sample(velocity, noise, steps=12, solver="unipc", shift_mu=1.15)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .schedules import (
    SPACINGS,
    make_timesteps,
    reference_schedule,
    shift_grid,
    spacing_grid,
    time_shift_mu,
)
from .guidance import Guidance, guided_nfe
from .solvers import SOLVERS, Callback, Velocity, check_solver, nfe, run_solver

__all__ = [
    "SOLVERS",
    "Guidance",
    "guided_nfe",
    "SPACINGS",
    "sample",
    "nfe",
    "make_timesteps",
    "reference_schedule",
    "time_shift_mu",
    "shift_grid",
    "spacing_grid",
    "Velocity",
    "Callback",
]

_SPACING_KEYS = frozenset({"logsnr_max", "rho", "t_min"})


def _check_timesteps(ts: Sequence[float]) -> list[float]:
    """Explicit schedules must be strictly decreasing inside [0, 1] (multistep
    solvers divide by step sizes, and t outside [0, 1] has no meaning)."""
    out = [float(t) for t in ts]
    if len(out) < 2:
        raise ValueError("timesteps needs at least 2 values (start and end)")
    if not all(0.0 <= t <= 1.0 for t in out):
        raise ValueError("timesteps must lie in [0, 1]")
    if not all(a > b for a, b in zip(out[:-1], out[1:])):
        raise ValueError("timesteps must be strictly decreasing (t = 1 noise -> t = 0 data)")
    return out


def sample(
    velocity: Velocity,
    noise: torch.Tensor,
    steps: int | None,
    solver: str = "euler",
    spacing: str = "linear",
    shift_mu: float | None = None,
    **options: object,
) -> torch.Tensor:
    """Integrate the flow ODE from ``noise`` (t = 1) to data (t = 0).

    Options: ``timesteps`` (explicit list, overrides steps/spacing/shift_mu;
    ``steps`` may then be None), ``callback(step_index, t_reached, x)`` after
    every step, spacing options (``logsnr_max``; ``rho``, ``t_min`` for karras)
    and solver options (``order``, ``corrector`` for unipc).  Returns x at the
    last timestep (t = 0 unless ``timesteps`` says otherwise) in noise's dtype.
    ``solver="euler"`` with the default spacing is bit-identical to the
    reference loop.
    """
    options = dict(options)
    timesteps = options.pop("timesteps", None)
    callback = options.pop("callback", None)
    spacing_opts = {k: options.pop(k) for k in list(options) if k in _SPACING_KEYS}
    check_solver(solver, options)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; valid spacings: {', '.join(SPACINGS)}")
    if timesteps is None:
        if steps is None:
            raise ValueError("give steps (or an explicit timesteps list)")
        ts = make_timesteps(steps, spacing, shift_mu, **spacing_opts)  # type: ignore[arg-type]
    else:
        ts = _check_timesteps(timesteps)  # type: ignore[arg-type]
        if steps is not None and steps != len(ts) - 1:
            raise ValueError(f"steps={steps} but timesteps has {len(ts) - 1} intervals")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable(step_index, t, x)")
    return run_solver(solver, velocity, noise, ts, callback, **options)  # type: ignore[arg-type]
