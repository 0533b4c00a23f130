"""ODE solvers for rectified-flow sampling, model-agnostic.

Convention: ``velocity(x, t) -> v`` with t a Python float, t = 1 noise, t = 0
data, ``dx/dt = v``, so one Euler step is ``x + (t_next - t) * v``.

Data prediction (for the exponential-integrator solvers):
``x0 = x - t*v`` (since ``x = (1-t)x0 + t*eps`` and ``v = eps - x0``), with
``alpha_t = 1 - t``, ``sigma_t = t``, ``lambda = log(alpha/sigma)``.  The
exponential-integrator update over ``s -> t`` with data prediction D is

    x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) D = (t/s) x_s + (1 - t/s) D

(``h = lambda_t - lambda_s``); the second form has no λ in it, which is what
makes the endpoints t = 1 (λ = -inf) and t = 0 (λ = +inf) safe.  With D equal
to the current x0-prediction it is exactly an Euler step.

Precision: ``euler`` runs in x's dtype with no extra casts, so it reproduces
the reference loop bit for bit (fp32 and bf16).  The other solvers keep their
state and history in at least float32 (bf16/fp16 x would otherwise lose the
small multistep corrections) and hand the model x in its own dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = ["SOLVERS", "nfe", "run_solver", "Velocity", "Callback"]

Velocity = Callable[[torch.Tensor, float], torch.Tensor]
Callback = Callable[[int, float, torch.Tensor], None]

#: Every accepted ``solver=`` name.
SOLVERS: tuple[str, ...] = ("euler", "heun", "dpmpp_2m", "unipc")

_SOLVER_OPTIONS: dict[str, frozenset[str]] = {
    "euler": frozenset(),
    "heun": frozenset(),
    "dpmpp_2m": frozenset(),
    "unipc": frozenset({"order", "corrector"}),
}


def check_solver(solver: str, options: dict[str, object]) -> None:
    """Reject unknown solver names (listing valid ones) and unknown options."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid solvers: {', '.join(SOLVERS)}")
    unknown = set(options) - _SOLVER_OPTIONS[solver]
    if unknown:
        raise TypeError(f"solver {solver!r} does not take option(s) {sorted(unknown)}")
    if solver == "unipc" and int(options.get("order", 2)) not in (1, 2, 3):  # type: ignore[call-overload]
        raise ValueError("unipc order must be 1, 2 or 3")


def nfe(solver: str, steps: int, ends_at_zero: bool = True) -> int:
    """Velocity evaluations per sample (one per CFG branch not counted).

    Heun skips its second evaluation on a final step to t = 0, so it costs
    ``2*steps - 1`` on the usual schedules; every other solver costs ``steps``.
    """
    check_solver(solver, {})
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if solver == "heun":
        return 2 * steps - (1 if ends_at_zero else 0)
    return steps


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself otherwise (float64 stays)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _euler(velocity: Velocity, x: torch.Tensor, ts: Sequence[float], callback: Callback | None) -> torch.Tensor:
    """The reference loop, verbatim: dt in Python float64, product and add in x's dtype."""
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        v = velocity(x, t_cur)
        x = x + (t_next - t_cur) * v
        if callback is not None:
            callback(i, t_next, x)
    return x


def _heun(velocity: Velocity, x: torch.Tensor, ts: Sequence[float], callback: Callback | None) -> torch.Tensor:
    """Explicit trapezoid (2nd order).  A final step to t = 0 is a plain Euler
    step, as in EDM: it saves an evaluation at the data end, and Euler from
    t_{n-1} to 0 returns the x0-prediction, whose error is already O(t_{n-1}^2)."""
    dtype, wd = x.dtype, _work_dtype(x.dtype)
    y = x.to(wd)
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t_next - t_cur
        v1 = velocity(y.to(dtype), t_cur).to(wd)
        y_pred = y + dt * v1
        if t_next == 0.0:
            y = y_pred
        else:
            v2 = velocity(y_pred.to(dtype), t_next).to(wd)
            y = y + (0.5 * dt) * (v1 + v2)
        if callback is not None:
            callback(i, t_next, y.to(dtype))
    return y.to(dtype)


def _lam(t: float) -> float:
    """Half log-SNR λ = log((1-t)/t); ±inf at the endpoints."""
    if t <= 0.0:
        return math.inf
    if t >= 1.0:
        return -math.inf
    return math.log1p(-t) - math.log(t)


def _ei_update(y: torch.Tensor, s: float, t: float, d: torch.Tensor) -> torch.Tensor:
    """Exponential-integrator step ``(t/s) y + (1 - t/s) d`` (see module doc)."""
    ratio = t / s
    return ratio * y + (1.0 - ratio) * d


def _dpmpp_2m(velocity: Velocity, x: torch.Tensor, ts: Sequence[float], callback: Callback | None) -> torch.Tensor:
    """DPM-Solver++(2M), data prediction, midpoint form.

    The first step is first order.  A step whose previous interval started at
    t = 1 also is (r = h_prev/h = inf, so the correction vanishes), and the
    final step to t = 0 (h = inf) returns the current x0-prediction.
    """
    dtype, wd = x.dtype, _work_dtype(x.dtype)
    y = x.to(wd)
    prev_d: torch.Tensor | None = None
    prev_h = math.nan
    for i, (s, t) in enumerate(zip(ts[:-1], ts[1:])):
        v = velocity(y.to(dtype), s).to(wd)
        d0 = y - s * v
        h = _lam(t) - _lam(s)
        d = d0
        if prev_d is not None and math.isfinite(h) and math.isfinite(prev_h):
            r = prev_h / h
            d = d0 + (0.5 / r) * (d0 - prev_d)
        y = _ei_update(y, s, t, d) if t > 0.0 else d
        prev_d, prev_h = d0, h
        if callback is not None:
            callback(i, t, y.to(dtype))
    return y.to(dtype)


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for the tiny (≤3×3) UniPC systems."""
    n = len(b)
    m = [row[:] + [rhs] for row, rhs in zip(a, b)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            for k in range(c, n + 1):
                m[r][k] -= f * m[c][k]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (m[r][n] - sum(m[r][k] * out[k] for k in range(r + 1, n))) / m[r][r]
    return out


def _unipc_b(h: float, order: int) -> list[float]:
    """UniPC B(h)=e^{-h}-1 ("bh2") right-hand side b_1..b_order, data prediction.

    Computed in float64 with the paper's φ-recursion; h = inf (a step from
    t = 1) gives the exact limits (b_1 = 1: all weight on the end point).
    """
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1
    h_phi_k = h_phi_1 / hh - 1.0
    fact = 1
    out = []
    for i in range(1, order + 1):
        out.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    return out


def _unipc(
    velocity: Velocity,
    x: torch.Tensor,
    ts: Sequence[float],
    callback: Callback | None,
    order: int = 2,
    corrector: bool = True,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023), B(h) = bh2, data prediction.

    UniP-p predicts with the last p data predictions; UniC re-uses the model
    evaluation at the new point (free: it is the next step's input) to raise
    the order by one.  Only points with finite λ enter the polynomial, so
    t = 1 history is dropped (its λ is -inf) and the order warms up; the final
    step to t = 0 is first order (returns the x0-prediction), and has no
    corrector because nothing is evaluated at t = 0.  As in diffusers, the
    data prediction stored for a point is the one made from the predicted
    (uncorrected) state the model actually saw.
    """
    dtype, wd = x.dtype, _work_dtype(x.dtype)
    y = x.to(wd)
    hist_lam: list[float] = []  # λ of stored data predictions (finite only), oldest first
    hist_d: list[torch.Tensor] = []
    last: tuple[torch.Tensor, float, float, torch.Tensor, list[float], list[torch.Tensor], int] | None = None
    n = len(ts) - 1
    for i in range(n):
        s, t = ts[i], ts[i + 1]
        v = velocity(y.to(dtype), s).to(wd)
        d_s = y - s * v
        if corrector and last is not None:
            y_prev, s_prev, lam_prev, d_prev, c_lams, c_ds, c_order = last
            y = _unic(y_prev, s_prev, s, lam_prev, d_prev, d_s, c_lams, c_ds, c_order)
        lam_s = _lam(s)
        if math.isfinite(lam_s):
            hist_lam.append(lam_s)
            hist_d.append(d_s)
            del hist_lam[:-order], hist_d[:-order]
        if t == 0.0 or not math.isfinite(lam_s):
            p = 1
        else:
            p = min(order, len(hist_lam))
        older_l, older_d = hist_lam[:-1][::-1][: p - 1], hist_d[:-1][::-1][: p - 1]
        y_new = _unip(y, s, t, lam_s, d_s, older_l, older_d, p)
        last = (y, s, lam_s, d_s, older_l, older_d, p)
        y = y_new
        if callback is not None:
            callback(i, t, y.to(dtype))
    return y.to(dtype)


def _rks_and_diffs(
    lam_s: float, h: float, d_s: torch.Tensor, lams: list[float], ds: list[torch.Tensor]
) -> tuple[list[float], list[torch.Tensor]]:
    rks = [(lam_k - lam_s) / h for lam_k in lams]
    return rks, [(d_k - d_s) / rk for rk, d_k in zip(rks, ds)]


def _unip(
    y: torch.Tensor, s: float, t: float, lam_s: float, d_s: torch.Tensor,
    lams: list[float], ds: list[torch.Tensor], p: int,
) -> torch.Tensor:
    """UniP-p predictor from s to t (p-1 older points in ``lams``/``ds``)."""
    if t == 0.0:
        return d_s
    if p == 1:
        return _ei_update(y, s, t, d_s)
    h = _lam(t) - lam_s
    rks, diffs = _rks_and_diffs(lam_s, h, d_s, lams, ds)
    b = _unipc_b(h, p)
    r_mat = [[rk ** k for rk in rks] for k in range(p - 1)]
    rhos = _solve(r_mat, b[: p - 1])
    corr = sum(rho * dd for rho, dd in zip(rhos, diffs))
    return _ei_update(y, s, t, d_s + corr)


def _unic(
    y_s: torch.Tensor, s: float, t: float, lam_s: float, d_s: torch.Tensor, d_t: torch.Tensor,
    lams: list[float], ds: list[torch.Tensor], p: int,
) -> torch.Tensor:
    """UniC-p corrector: redo the step s -> t using the new data prediction d_t."""
    h = _lam(t) - lam_s
    if not math.isfinite(h):  # step from t = 1: the exact limit of the weights is rho = [1]
        return _ei_update(y_s, s, t, d_t)
    rks, diffs = _rks_and_diffs(lam_s, h, d_s, lams, ds)
    rks.append(1.0)
    b = _unipc_b(h, p)
    r_mat = [[rk ** k for rk in rks] for k in range(p)]
    rhos = _solve(r_mat, b)
    corr = sum(rho * dd for rho, dd in zip(rhos[:-1], diffs)) + rhos[-1] * (d_t - d_s)
    return _ei_update(y_s, s, t, d_s + corr)


def run_solver(
    solver: str,
    velocity: Velocity,
    x: torch.Tensor,
    timesteps: Sequence[float],
    callback: Callback | None = None,
    **options: object,
) -> torch.Tensor:
    """Integrate from ``timesteps[0]`` to ``timesteps[-1]`` (already validated)."""
    check_solver(solver, options)
    if solver == "euler":
        return _euler(velocity, x, timesteps, callback)
    if solver == "heun":
        return _heun(velocity, x, timesteps, callback)
    if solver == "dpmpp_2m":
        return _dpmpp_2m(velocity, x, timesteps, callback)
    return _unipc(
        velocity, x, timesteps, callback,
        order=int(options.get("order", 2)),  # type: ignore[call-overload]
        corrector=bool(options.get("corrector", True)),
    )
