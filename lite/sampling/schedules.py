"""Timestep schedules for rectified-flow sampling (t = 1 is noise, t = 0 is data).

The reference (Ovis-U1 ``get_schedule``) builds ``linspace(1, 0, steps + 1)`` in
float32 and applies the resolution-dependent time shift μ in float32.  Those
float32 roundings are reproduced exactly here because the first value (e.g.
0.99999994 instead of 1.0) reaches the timestep embedding and changes it by up
to ~6e-5 (spec §8, golden case 7).

Every spacing produces an *unshifted* grid u (float32, 1 → 0, strictly
decreasing) and then goes through the same shift
``t = e^μ / (e^μ + (1/u − 1))``, which is a translation by μ in logit space:
``logit(t) = logit(u) + μ``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "SPACINGS",
    "time_shift_mu",
    "reference_schedule",
    "shift_grid",
    "spacing_grid",
    "make_timesteps",
]

#: Every accepted ``spacing=`` name.
SPACINGS: tuple[str, ...] = ("linear", "logsnr", "karras")

_SPACING_OPTIONS: dict[str, frozenset[str]] = {
    "linear": frozenset(),
    "logsnr": frozenset({"logsnr_max"}),
    "karras": frozenset({"rho", "t_min"}),
}


def time_shift_mu(
    image_seq_len: int,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    x1: int = 256,
    x2: int = 4096,
) -> float:
    """μ for ``image_seq_len`` target tokens, as the reference's linear fit.

    Written as ``m*L + b`` (not ``base + m*(L - x1)``) because that is how the
    reference evaluates it; the two can differ in the last float64 bit.
    """
    m = (max_shift - base_shift) / (x2 - x1)
    b = base_shift - m * x1
    return m * image_seq_len + b


def shift_grid(u: torch.Tensor, mu: float, sigma: float = 1.0) -> torch.Tensor:
    """Apply the reference time shift to a float32 grid, op for op.

    ``math.exp(mu) / tensor`` is evaluated by PyTorch as ``reciprocal * scalar``
    with the scalar rounded to float32; writing the same Python expression on
    the same dtype reproduces the reference bit for bit (u = 0 gives 1/u = inf,
    hence exactly 0).
    """
    if u.dtype != torch.float32:
        raise TypeError(f"shift_grid expects a float32 grid, got {u.dtype}")
    return math.exp(mu) / (math.exp(mu) + (1 / u - 1) ** sigma)


def reference_schedule(
    steps: int,
    image_seq_len: int,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    shift: bool = True,
) -> list[float]:
    """The reference ``get_schedule``: ``steps + 1`` Python floats from 1 to 0."""
    _check_steps(steps)
    t = torch.linspace(1, 0, steps + 1)
    if shift:
        t = shift_grid(t, time_shift_mu(image_seq_len, base_shift, max_shift))
    return t.tolist()


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _logit_grid(steps: int, logsnr_max: float | None) -> list[float]:
    """Interior points uniform in λ = log((1-u)/u), endpoints 1 and 0.

    The default range ±log(steps-1) puts the first and last interior points
    exactly where the linear grid has them (u = 1 - 1/n and 1/n), so the two
    spacings differ only in how they distribute the points in between.
    """
    if steps == 1:
        return [1.0, 0.0]
    lam_max = math.log(steps - 1) if logsnr_max is None else float(logsnr_max)
    if steps > 2 and lam_max <= 0:
        raise ValueError(f"logsnr_max must be > 0, got {lam_max}")
    inner = steps - 1
    lams = [0.0] if inner == 1 else [-lam_max + 2 * lam_max * i / (inner - 1) for i in range(inner)]
    return [1.0] + [1.0 / (1.0 + math.exp(lam)) for lam in lams] + [0.0]


def _karras_grid(steps: int, rho: float, t_min: float) -> list[float]:
    """Karras et al. ρ-spacing on t in [t_min, 1], then 0 (diffusers' flow variant)."""
    if not 0.0 < t_min < 1.0:
        raise ValueError(f"t_min must lie in (0, 1), got {t_min}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    if steps == 1:
        return [1.0, 0.0]
    hi, lo = 1.0, t_min ** (1.0 / rho)
    pts = [(hi + i / (steps - 1) * (lo - hi)) ** rho for i in range(steps)]
    pts[0] = 1.0
    return pts + [0.0]


def spacing_grid(steps: int, spacing: str = "linear", **options: float) -> torch.Tensor:
    """Unshifted float32 grid of ``steps + 1`` points, strictly decreasing 1 → 0."""
    _check_steps(steps)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; valid spacings: {', '.join(SPACINGS)}")
    unknown = set(options) - _SPACING_OPTIONS[spacing]
    if unknown:
        raise TypeError(f"spacing {spacing!r} does not take option(s) {sorted(unknown)}")
    if spacing == "linear":
        return torch.linspace(1, 0, steps + 1)
    if spacing == "logsnr":
        pts = _logit_grid(steps, options.get("logsnr_max"))
    else:
        pts = _karras_grid(steps, float(options.get("rho", 7.0)), float(options.get("t_min", 1e-3)))
    u = torch.tensor(pts, dtype=torch.float64).to(torch.float32)
    if not bool((u[1:] < u[:-1]).all()):
        raise ValueError(f"spacing {spacing!r} with {steps} steps collapses in float32; use fewer steps")
    return u


def make_timesteps(
    steps: int,
    spacing: str = "linear",
    shift_mu: float | None = None,
    **options: float,
) -> list[float]:
    """Timesteps as Python floats (float32 values), optionally μ-shifted.

    ``make_timesteps(n, "linear", time_shift_mu(L))`` equals
    ``reference_schedule(n, L)`` exactly.
    """
    u = spacing_grid(steps, spacing, **options)
    if shift_mu is not None:
        u = shift_grid(u, float(shift_mu))
    return u.tolist()
