#!/usr/bin/env python
"""Few-step sampling benchmark for ``lite.sampling``.

Sections (run all by default, or one with ``--only NAME``):

* ``analytic`` -- data from a Gaussian mixture, whose rectified-flow velocity
  has a closed form, so every solver × spacing × NFE can be scored against a
  very fine float64 RK4 solution from the same noise.  No model needed.

More sections (e.g. a tiny-model benchmark) are added by writing a function
``name(args) -> dict`` and registering it in ``SECTIONS``.

    python scripts/bench_steps.py                 # text tables
    python scripts/bench_steps.py --json          # machine-readable
    python scripts/bench_steps.py --only analytic --batch 256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lite.sampling import SPACINGS, nfe, sample  # noqa: E402

# (label, solver name, solver options) -- unipc at order 2 and 3 are separate rows.
SOLVER_VARIANTS: tuple[tuple[str, str, dict[str, object]], ...] = (
    ("euler", "euler", {}),
    ("heun", "heun", {}),
    ("dpmpp_2m", "dpmpp_2m", {}),
    ("unipc", "unipc", {"order": 2}),
    ("unipc3", "unipc", {"order": 3}),
)
NFE_GRID: tuple[int, ...] = (4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50)
SHIFTS: tuple[float | None, ...] = (None, 1.15)  # none, and μ of a 1024² image (N_t = 4096)


@dataclass
class GaussianMixture:
    """x0 ~ Σ π_k N(m_k, s_k² I): exact E[x0 | x_t] for x_t = (1-t) x0 + t ε."""

    weights: torch.Tensor  # [K]
    means: torch.Tensor  # [K, D]
    stds: torch.Tensor  # [K]

    @classmethod
    def random(cls, dim: int, components: int, seed: int) -> GaussianMixture:
        g = torch.Generator().manual_seed(seed)
        w = torch.rand(components, generator=g, dtype=torch.float64) + 0.5
        means = torch.randn(components, dim, generator=g, dtype=torch.float64)
        # Component widths from 0.05 to 0.4: the narrow ones make the last steps hard,
        # like fine image detail does.
        stds = torch.exp(torch.linspace(math.log(0.05), math.log(0.4), components, dtype=torch.float64))
        return cls(w / w.sum(), means, stds)

    def velocity(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """v = E[ε - x0 | x_t = x], per component and posterior-weighted.

        Per component k: x_t ~ N(a m_k, (a² s_k² + t²) I) with a = 1 - t, and
        E[ε - x0 | x, k] = (t - a s_k²)/var_k · (x - a m_k) - m_k.  This form
        stays finite at t = 0 (where v = -x) unlike (x - E[x0|x])/t.
        """
        xd = x.to(torch.float64)
        a = 1.0 - t
        var = a * a * self.stds**2 + t * t  # [K]
        # ||x - a m_k||² expanded so that everything is a [B, K] matmul, no [B, K, D] tensor.
        sq = (xd * xd).sum(-1, keepdim=True) - 2 * a * xd @ self.means.T + a * a * (self.means**2).sum(-1)
        d = xd.shape[-1]
        logw = torch.log(self.weights) - 0.5 * d * torch.log(var) - sq / (2 * var)
        post = torch.softmax(logw, dim=-1)  # [B, K]
        c = (t - a * self.stds**2) / var  # [K]
        # Σ_k w_k [c_k (x - a m_k) - m_k]
        v = (post @ c)[:, None] * xd - (post * (a * c + 1.0)) @ self.means
        return v.to(x.dtype)


def rk4_reference(velocity: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, steps: int) -> torch.Tensor:
    """Classic RK4 from t = 1 to 0 on a uniform grid, in x's dtype (float64 here)."""
    h = -1.0 / steps
    for i in range(steps):
        t = 1.0 - i / steps
        k1 = velocity(x, t)
        k2 = velocity(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = velocity(x + 0.5 * h * k2, t + 0.5 * h)
        k4 = velocity(x + h * k3, max(t + h, 0.0))
        x = x + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def steps_for_nfe(solver: str, budget: int) -> int:
    """Most steps whose evaluation count fits the budget."""
    n = 1
    while nfe(solver, n + 1) <= budget:
        n += 1
    return n


def _mean_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(torch.float64) - b.to(torch.float64)).norm(dim=-1).mean())


def machine() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores ({platform.processor() or 'unknown'}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def analytic_benchmark(args: argparse.Namespace) -> dict[str, object]:
    """Endpoint error of every solver × spacing × NFE on a Gaussian mixture."""
    t0 = time.perf_counter()
    gm = GaussianMixture.random(args.dim, args.components, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    noise64 = torch.randn(args.batch, args.dim, generator=g, dtype=torch.float64)
    ref = rk4_reference(gm.velocity, noise64, args.ref_steps)
    ref_check = rk4_reference(gm.velocity, noise64, args.ref_steps // 2)
    noise = noise64.to(torch.float32)

    rows: list[dict[str, object]] = []
    for shift in SHIFTS:
        for label, solver, opts in SOLVER_VARIANTS:
            for spacing in SPACINGS:
                done: set[int] = set()
                for budget in NFE_GRID:
                    n = steps_for_nfe(solver, budget)
                    if n in done:
                        continue
                    done.add(n)
                    x = sample(gm.velocity, noise, n, solver, spacing, shift, **opts)
                    rows.append({
                        "solver": label, "spacing": spacing, "shift_mu": shift,
                        "steps": n, "nfe": nfe(solver, n), "error": _mean_l2(x, ref),
                    })

    # Same runs with bf16 x (the real latent dtype): Euler stays in bf16, the other
    # solvers keep a float32 state, so their error should barely move.
    bf16 = []
    for label, solver, opts, spacing, n in (("euler", "euler", {}, "linear", 50), ("unipc", "unipc", {"order": 2}, "karras", 12)):
        x = sample(gm.velocity, noise.to(torch.bfloat16), n, solver, spacing, 1.15, **opts)
        fp32 = next(r["error"] for r in rows if r["solver"] == label and r["spacing"] == spacing
                    and r["shift_mu"] == 1.15 and r["steps"] == n)
        bf16.append({"solver": label, "spacing": spacing, "shift_mu": 1.15, "steps": n, "nfe": nfe(solver, n),
                     "error_bf16": _mean_l2(x, ref), "error_fp32": fp32})

    summary = {}
    for shift in SHIFTS:
        sub = [r for r in rows if r["shift_mu"] == shift]
        target = next(r["error"] for r in sub if r["solver"] == "euler" and r["spacing"] == "linear" and r["nfe"] == 50)
        hits = sorted((r for r in sub if r["error"] <= target and r["nfe"] <= 20), key=lambda r: (r["nfe"], r["error"]))
        best_12 = min((r for r in sub if r["nfe"] <= 12), key=lambda r: r["error"])
        best_per_nfe = {}
        for budget in NFE_GRID:
            cand = [r for r in sub if r["nfe"] <= budget]
            best_per_nfe[budget] = min(cand, key=lambda r: r["error"])
        summary["none" if shift is None else f"mu={shift}"] = {
            "euler_linear_50": target,
            "fewest_nfe_reaching_euler50": hits[0] if hits else None,
            "best_at_most_12_nfe": best_12,
            "best_at_most_12_nfe_ratio_to_euler50": best_12["error"] / target,
            "best_per_nfe_budget": best_per_nfe,
        }
    return {
        "machine": machine(),
        "data": {"kind": "gaussian_mixture", "dim": args.dim, "components": args.components,
                 "component_stds": [round(float(s), 4) for s in gm.stds], "seed": args.seed},
        "batch": args.batch,
        "solver_dtype": "float32",
        "reference": {"method": "rk4_float64_uniform_t", "steps": args.ref_steps,
                      "error_vs_half_steps": _mean_l2(ref, ref_check)},
        "metric": "mean over the batch of the L2 distance (over dims) between the sampled and reference endpoints",
        "rows": rows,
        "bf16_check": bf16,
        "summary": summary,
        "seconds": round(time.perf_counter() - t0, 2),
    }


SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, object]]] = {
    "analytic": analytic_benchmark,
}


def _print_analytic(res: dict[str, object]) -> None:
    rows: list[dict[str, object]] = res["rows"]  # type: ignore[assignment]
    print(f"# analytic: {res['data']}, batch {res['batch']}, {res['machine']}")
    print(f"# reference {res['reference']}")
    for shift in SHIFTS:
        print(f"\n## shift_mu = {shift}   (error: mean L2 to reference; columns = NFE budget)")
        print(f"{'solver':9s} {'spacing':8s} " + " ".join(f"{b:>8d}" for b in NFE_GRID))
        for label, solver, _ in SOLVER_VARIANTS:
            for spacing in SPACINGS:
                sub = [r for r in rows if r["shift_mu"] == shift and r["solver"] == label and r["spacing"] == spacing]
                cells = []
                for b in NFE_GRID:
                    fit = [r for r in sub if r["nfe"] <= b]
                    cells.append(f"{max(fit, key=lambda r: r['nfe'])['error']:8.4f}" if fit else f"{'-':>8s}")
                print(f"{label:9s} {spacing:8s} " + " ".join(cells))
    print("\n## summary")
    print(json.dumps(res["summary"], indent=1, default=str))
    print("\n## bf16 x")
    for r in res["bf16_check"]:  # type: ignore[union-attr]
        print(r)
    print(f"\n({res['seconds']} s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--only", choices=sorted(SECTIONS), help="run just this section")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--components", type=int, default=8)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--ref-steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny tensors: 1 is fastest)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [args.only] if args.only else list(SECTIONS)
    results = {name: SECTIONS[name](args) for name in names}
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for name, res in results.items():
            if name == "analytic":
                _print_analytic(res)
            else:
                print(json.dumps({name: res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
