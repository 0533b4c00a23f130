"""Tests for lite.sampling: reference schedule parity, Euler bit-parity, solver orders, API checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lite.sampling import (
    SOLVERS,
    SPACINGS,
    make_timesteps,
    nfe,
    reference_schedule,
    sample,
    spacing_grid,
    time_shift_mu,
)

GOLDEN = Path("/work/shared/golden/golden.safetensors")
needs_golden = pytest.mark.skipif(not GOLDEN.exists(), reason="golden fixtures not available")


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(GOLDEN))


# --- schedule -----------------------------------------------------------------


@needs_golden
def test_golden_case7_schedule_exact(golden: dict[str, torch.Tensor]) -> None:
    pairs = golden["schedule.pairs"].tolist()
    assert len(pairs) == 8
    for i, (n, seq) in enumerate(pairs):
        want = golden[f"schedule.steps{n}_seq{seq}"].tolist()
        assert reference_schedule(n, seq) == want, (n, seq)
        assert make_timesteps(n, "linear", time_shift_mu(seq)) == want, (n, seq)
        assert time_shift_mu(seq) == golden["schedule.mu"][i].item()
    assert reference_schedule(3, 12)[0] == 0.9999999403953552
    assert reference_schedule(3, 12)[-1] == 0.0


def test_time_shift_mu_values() -> None:
    assert time_shift_mu(4096) == pytest.approx(1.15, abs=1e-15)  # 1024² image
    assert time_shift_mu((512 // 16) ** 2) == pytest.approx(0.63, abs=1e-15)  # 512² image
    assert time_shift_mu(256) == pytest.approx(0.5, abs=1e-15)


def test_unshifted_reference_is_linspace() -> None:
    assert reference_schedule(7, 4096, shift=False) == torch.linspace(1, 0, 8).tolist()
    assert make_timesteps(7) == torch.linspace(1, 0, 8).tolist()


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("mu", [None, 0.63, 1.15])
@pytest.mark.parametrize("steps", [1, 2, 3, 12, 50])
def test_spacings_monotone_endpoints(spacing: str, mu: float | None, steps: int) -> None:
    ts = make_timesteps(steps, spacing, mu)
    assert len(ts) == steps + 1
    assert ts[-1] == 0.0
    assert ts[0] == pytest.approx(1.0, abs=1.2e-7)  # 0.99999994 is the reference's float32 value
    assert spacing_grid(steps, spacing)[0].item() == 1.0
    assert all(a > b for a, b in zip(ts[:-1], ts[1:]))


def test_shift_moves_steps_toward_noise() -> None:
    plain, shifted = make_timesteps(10), make_timesteps(10, shift_mu=1.15)
    assert all(s >= p for p, s in zip(plain, shifted))


# --- Euler bit parity -----------------------------------------------------------


def _reference_euler(v_fn, x: torch.Tensor, timesteps: list[float]) -> torch.Tensor:
    """The spec §3.8 loop: dt from Python floats, ``x + dt * v`` in x's dtype."""
    for t_cur, t_next in zip(timesteps[:-1], timesteps[1:]):
        v = v_fn(x, t_cur)
        x = x + (t_next - t_cur) * v
    return x


def _toy_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    """Nonlinear, dtype-preserving stand-in for a model (bf16 rounding matters)."""
    return torch.tanh(x * (1.7 - t)) - 0.31 * x + t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("steps,seq", [(3, 12), (8, 4096), (50, 4096), (6, 5000)])
def test_euler_bitwise_matches_reference_loop(dtype: torch.dtype, steps: int, seq: int) -> None:
    g = torch.Generator().manual_seed(steps * 7 + seq)
    noise = torch.randn(2, 12, 16, generator=g).to(dtype)
    ts = reference_schedule(steps, seq)
    want = _reference_euler(_toy_velocity, noise, ts)
    got = sample(_toy_velocity, noise, steps, shift_mu=time_shift_mu(seq))
    got_explicit = sample(_toy_velocity, noise, None, timesteps=ts)
    assert got.dtype == dtype
    assert torch.equal(got, want)
    assert torch.equal(got_explicit, want)


@needs_golden
def test_euler_reproduces_golden_t2i_denoise(golden: dict[str, torch.Tensor]) -> None:
    """Replay the stored CFG velocities: every Euler state and the final latent are bit-exact."""
    ts = golden["t2i.timesteps"].tolist()
    inputs, vel = golden["t2i.step_inputs"], golden["t2i.velocities"]
    seen: list[torch.Tensor] = []

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        s = ts.index(t)
        assert torch.equal(x, inputs[s])
        seen.append(x)
        v_c, v_u = vel[s, 0], vel[s, 1]
        return v_u + 5.0 * (v_c - v_u)

    out = sample(velocity, golden["t2i.packed_noise"], len(ts) - 1, timesteps=ts)
    assert len(seen) == len(ts) - 1
    assert torch.equal(out, golden["t2i.final_latent"])


# --- solver orders ---------------------------------------------------------------

# Gaussian data N(m, s²): the flow velocity is linear in x and the ODE has the
# closed form x(t) = (1-t) m + sqrt((1-t)² s² + t²) · x(1).
_M, _S2 = 0.7, 1.0


def _gauss_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    var = (1 - t) ** 2 * _S2 + t * t
    return ((t - (1 - t) * _S2) / var) * (x - (1 - t) * _M) - _M


def _gauss_exact(x1: torch.Tensor, t: float) -> torch.Tensor:
    return (1 - t) * _M + math.sqrt((1 - t) ** 2 * _S2 + t * t) * x1


def _observed_order(solver: str, a: float, b: float, ns: tuple[int, int], **opts: object) -> float:
    x1 = torch.linspace(-3, 3, 13, dtype=torch.float64)
    errs = []
    for n in ns:
        ts = [a + (b - a) * i / n for i in range(n + 1)]
        x = sample(_gauss_velocity, _gauss_exact(x1, a), None, solver, timesteps=ts, **opts)
        errs.append((x - _gauss_exact(x1, b)).abs().max().item())
    return math.log(errs[0] / errs[1]) / math.log(ns[1] / ns[0])


ORDER_CASES: list[tuple[str, dict[str, object], float]] = [
    ("euler", {}, 1.0),
    ("heun", {}, 2.0),
    ("dpmpp_2m", {}, 2.0),
    ("unipc", {"order": 1}, 2.0),  # UniP-1 + UniC-1
    ("unipc", {"order": 2}, 3.0),  # UniP-2 + UniC-2
    ("unipc", {"order": 3}, 4.0),
    ("unipc", {"order": 2, "corrector": False}, 2.0),
]


@pytest.mark.parametrize("solver,opts,order", ORDER_CASES)
def test_convergence_order_interior(solver: str, opts: dict[str, object], order: float) -> None:
    """Away from the endpoints every solver shows its theoretical order."""
    assert _observed_order(solver, 0.9, 0.1, (64, 128), **opts) >= order - 0.2


@pytest.mark.parametrize("solver,opts,order", ORDER_CASES)
def test_convergence_order_full_interval(solver: str, opts: dict[str, object], order: float) -> None:
    """From t = 1 to 0 the first-order final step (x0-prediction, error O(t_{n-1}²)) caps all at 2."""
    assert _observed_order(solver, 1.0, 0.0, (64, 128), **opts) >= min(order, 2.0) - 0.2


@pytest.mark.parametrize("solver", SOLVERS)
def test_exact_for_single_point_data(solver: str) -> None:
    """Data = one point c: v = (x - c)/t is exact for Euler, so every solver must land on c."""
    c = torch.tensor([0.25, -1.5, 3.0])
    x = sample(lambda x, t: (x - c) / t, torch.randn(4, 3), 5, solver, shift_mu=1.15)
    assert torch.allclose(x, c.expand(4, 3), atol=1e-5)


# --- API ----------------------------------------------------------------------------


def test_unknown_names_raise_listing_valid() -> None:
    v = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError) as e:
        sample(v, torch.zeros(2), 4, solver="rk45")
    assert all(name in str(e.value) for name in SOLVERS)
    with pytest.raises(ValueError) as e:
        sample(v, torch.zeros(2), 4, spacing="cosine")
    assert all(name in str(e.value) for name in SPACINGS)
    with pytest.raises(ValueError) as e:
        nfe("rk45", 4)
    assert all(name in str(e.value) for name in SOLVERS)
    with pytest.raises(TypeError):
        sample(v, torch.zeros(2), 4, solver="euler", order=2)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_steps_raise(steps: object) -> None:
    with pytest.raises(ValueError):
        sample(lambda x, t: x, torch.zeros(2), steps)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        nfe("euler", steps)  # type: ignore[arg-type]


def test_bad_timesteps_raise() -> None:
    v = lambda x, t: x  # noqa: E731
    for ts in ([1.0], [1.0, 0.5, 0.5, 0.0], [0.0, 1.0], [1.2, 0.0]):
        with pytest.raises(ValueError):
            sample(v, torch.zeros(2), None, timesteps=ts)
    with pytest.raises(ValueError):
        sample(v, torch.zeros(2), 3, timesteps=[1.0, 0.0])


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("steps", [1, 2, 7])
@pytest.mark.parametrize("end", [0.0, 0.05])
def test_nfe_counts_calls_and_callback(solver: str, steps: int, end: float) -> None:
    calls: list[float] = []
    progress: list[tuple[int, float]] = []

    def v(x: torch.Tensor, t: float) -> torch.Tensor:
        assert isinstance(t, float) and 0.0 <= t <= 1.0
        calls.append(t)
        return _gauss_velocity(x, t)

    ts = [1.0 + (end - 1.0) * i / steps for i in range(steps + 1)]
    sample(v, torch.randn(3, 4), None, solver, timesteps=ts, callback=lambda i, t, x: progress.append((i, t)))
    assert len(calls) == nfe(solver, steps, ends_at_zero=end == 0.0)
    assert progress == [(i, ts[i + 1]) for i in range(steps)]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dtype_preserved_and_model_sees_its_dtype(solver: str, dtype: torch.dtype) -> None:
    seen: set[torch.dtype] = set()

    def v(x: torch.Tensor, t: float) -> torch.Tensor:
        seen.add(x.dtype)
        return _gauss_velocity(x, t).to(x.dtype)

    out = sample(v, torch.randn(8, dtype=torch.float64).to(dtype), 6, solver, "karras", 1.15)
    assert out.dtype == dtype and seen == {dtype}
    assert torch.isfinite(out.float()).all()


def test_bf16_multistep_close_to_fp32() -> None:
    """The float32 state keeps bf16 runs within bf16 rounding of the fp32 result."""
    noise = torch.randn(64, generator=torch.Generator().manual_seed(0))
    for solver in ("dpmpp_2m", "unipc"):
        ref = sample(_gauss_velocity, noise, 12, solver, shift_mu=1.15)
        low = sample(lambda x, t: _gauss_velocity(x, t).to(x.dtype), noise.bfloat16(), 12, solver, shift_mu=1.15)
        assert (low.float() - ref).abs().max().item() < 0.05


def test_cases_json_describes_schedule_keys() -> None:
    cases = Path("/work/shared/golden/cases.json")
    if not cases.exists():
        pytest.skip("golden fixtures not available")
    text = json.dumps(json.loads(cases.read_text()))
    assert "schedule.pairs" in text
