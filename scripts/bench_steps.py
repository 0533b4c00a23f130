#!/usr/bin/env python
"""Few-step sampling benchmark for ``lite.sampling``.

Sections (run all by default, or one with ``--only NAME``):

* ``analytic`` -- data from a Gaussian mixture, whose rectified-flow velocity
  has a closed form, so every solver × spacing × NFE can be scored against a
  very fine float64 RK4 solution from the same noise.  No model needed.

* ``tiny`` -- a seeded random tiny Ovis-U1 checkpoint (``lite.model.tiny.make_tiny``),
  fp32 on the CPU, text-to-image (2-pass CFG) and edit (3-pass CFG) through
  ``OvisPipeline.denoise``: every solver × spacing × steps, and CFG intervals,
  scored against 50-step Euler with full CFG (relative L2 of the packed latent,
  PSNR of the decoded image) at the NFE the pipeline counts.  About 3 minutes.

More sections are added by writing a function ``name(args) -> dict`` and
registering it in ``SECTIONS``.

    python scripts/bench_steps.py                 # text tables
    python scripts/bench_steps.py --json          # machine-readable
    python scripts/bench_steps.py --only analytic --batch 256
    python scripts/bench_steps.py --only tiny --tiny-size 256
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


# ---------------------------------------------------------------------------------------------
# Part (b): a seeded random tiny Ovis-U1 checkpoint, through the pipeline's own denoise path.

TINY_STEPS: tuple[int, ...] = (4, 6, 8, 10, 12, 15, 20, 25, 50)
TINY_SOLVERS: tuple[str, ...] = ("euler", "heun", "dpmpp_2m", "unipc")
# Guidance only for t in [lo, hi] (t = 1 noise); elsewhere the cond branch alone (1 pass).
TINY_INTERVALS: tuple[tuple[float, float], ...] = (
    (0.0, 0.6), (0.0, 0.8), (0.1, 1.0), (0.2, 1.0), (0.1, 0.9), (0.3, 0.9),
)
TINY_INTERVAL_STEPS: tuple[int, ...] = (8, 10, 12, 15)
TINY_LONG = 50  # run only on linear spacing (plus the reference), to keep the section at ~3 minutes
TINY_BUDGETS: dict[str, tuple[int, ...]] = {
    "t2i": (8, 12, 16, 20, 24, 30, 40, 50, 100),
    "edit": (12, 18, 24, 30, 36, 45, 60, 75, 150),
}
TINY_FAST_BUDGET: dict[str, int] = {"t2i": 24, "edit": 36}
TINY_FINE_STEPS = 200  # unipc / linear on the shifted grid: a near-exact solution of the same ODE


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    return float((a64 - b64).norm() / b64.norm())


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """PSNR in dB of two uint8 images; None when identical (infinite)."""
    mse = float((a.to(torch.float64) - b.to(torch.float64)).pow(2).mean())
    return None if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)


def _edit_source(size: int) -> "Image.Image":  # noqa: F821 -- PIL imported lazily
    """A smooth deterministic test picture: gradients, a disc and a bar."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    disc = ((xx - 0.35) ** 2 + (yy - 0.4) ** 2 < 0.06).astype(float)
    bar = ((yy > 0.7) & (yy < 0.8)).astype(float)
    rgb = np.stack([0.2 + 0.6 * xx + 0.2 * disc, 0.3 + 0.5 * yy - 0.2 * bar, 0.8 - 0.5 * xx * yy + 0.2 * bar], -1)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


@dataclass
class _TinyTask:
    name: str
    passes: int
    rows: int
    cols: int
    x: torch.Tensor  # packed noise
    conditions: dict[str, object]
    txt_cfg: float
    img_cfg: float


def _tiny_tasks(pipe: object, size: int, seed: int) -> list[_TinyTask]:
    """Conditions built once per task, exactly as OvisPipeline.generate / edit build them."""
    from lite.model import latents
    from lite.model.processing import T2I_PREFIX, UNCONDITIONAL_PROMPT, edit_output_size, stretch, t2i_size, white_canvas

    dev = pipe.device  # type: ignore[attr-defined]
    tasks = []
    w, h = t2i_size(size, size)
    canvas = white_canvas(w, h)
    conds = {"cond": pipe.condition(T2I_PREFIX + "a red fox in the snow", canvas),  # type: ignore[attr-defined]
             "no_both": pipe.condition(UNCONDITIONAL_PROMPT, canvas)}  # type: ignore[attr-defined]
    noise = latents.latent_noise(h, w, seed, dev, pipe.dtype)  # type: ignore[attr-defined]
    tasks.append(_TinyTask("t2i", 2, h // 16, w // 16, latents.pack(noise), conds, 5.0, 0.0))

    src = _edit_source(size)
    w, h = edit_output_size(*src.size)
    source = stretch(src, w, h)
    conds = {"cond": pipe.condition("add a red hat", source),  # type: ignore[attr-defined]
             "no_both": pipe.condition(UNCONDITIONAL_PROMPT, white_canvas(w, h)),  # type: ignore[attr-defined]
             "no_txt": pipe.condition(UNCONDITIONAL_PROMPT, source)}  # type: ignore[attr-defined]
    cond_latent = pipe.encode_image(source, "mean", seed)  # type: ignore[attr-defined]
    cond_ids = latents.image_ids(h // 16, w // 16, index=1, device=dev)
    for name in ("cond", "no_txt"):
        conds[name].cond_latent, conds[name].cond_ids = cond_latent, cond_ids  # type: ignore[attr-defined]
    noise = latents.latent_noise(h, w, seed, dev, pipe.dtype)  # type: ignore[attr-defined]
    tasks.append(_TinyTask("edit", 3, h // 16, w // 16, latents.pack(noise), conds, 6.0, 1.5))
    return tasks


def tiny_model_benchmark(args: argparse.Namespace) -> dict[str, object]:
    """Deviation from 50-step Euler (full CFG) of every solver × spacing × steps, and of CFG intervals,
    for text-to-image and edit on a seeded random tiny checkpoint, through OvisPipeline.denoise."""
    import tempfile

    from lite.runtime.pipeline import OvisPipeline
    from lite.runtime.results import RunStats
    from lite.sampling import Guidance
    from lite.sampling import make_timesteps
    from lite.model.tiny import make_tiny

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ovis_tiny_") as tmp:
        make_tiny(Path(tmp) / "ckpt", seed=args.tiny_seed)
        pipe = OvisPipeline.from_pretrained(Path(tmp) / "ckpt", device="cpu", dtype=torch.float32, progress=False)
    tasks = _tiny_tasks(pipe, args.tiny_size, args.seed)

    def schedule(task: _TinyTask, steps: int, spacing: str) -> list[float]:
        if args.tiny_mu is None:  # the pipeline's own shifted schedule for this resolution
            return pipe.timesteps(steps, task.rows * task.cols, spacing)
        return make_timesteps(steps, spacing, args.tiny_mu)

    def run(task: _TinyTask, solver: str, spacing: str, steps: int,
            interval: tuple[float, float] | None = None) -> tuple[torch.Tensor, int]:
        stats = RunStats(task=task.name)
        out = pipe.denoise(task.x, task.rows, task.cols, task.conditions,  # type: ignore[arg-type]
                           Guidance(task.txt_cfg, task.img_cfg, interval), schedule(task, steps, spacing),
                           solver, stats)
        return out, stats.nfe

    def decode(task: _TinyTask, packed: torch.Tensor) -> torch.Tensor:
        import numpy as np

        return torch.from_numpy(np.asarray(pipe.decode(packed, task.rows, task.cols)).copy())

    # The direct path must be what generate() does: same latent, same NFE.
    check = {}
    t2i = tasks[0]
    captured: list[torch.Tensor] = []
    original = pipe.decode
    pipe.decode = lambda packed, rows, cols: (captured.append(packed), original(packed, rows, cols))[1]  # type: ignore[method-assign]
    try:
        if args.tiny_mu is None:
            pipe.generate("a red fox in the snow", width=args.tiny_size, height=args.tiny_size, steps=6,
                          seed=args.seed, txt_cfg=5.0, solver="unipc", spacing="karras", cfg_interval=(0.2, 1.0))
    finally:
        pipe.decode = original  # type: ignore[method-assign]
    if captured:
        direct, direct_nfe = run(t2i, "unipc", "karras", 6, (0.2, 1.0))
        check = {"setting": "t2i unipc/karras 6 steps, cfg_interval (0.2, 1.0)",
                 "max_abs_diff_vs_generate": float((direct - captured[0]).abs().max()),
                 "nfe_direct": direct_nfe, "nfe_generate": pipe.last_run.nfe}  # type: ignore[union-attr]

    results: dict[str, object] = {}
    for task in tasks:
        t_task = time.perf_counter()
        ref, ref_nfe = run(task, "euler", "linear", 50)
        ref_img = decode(task, ref)
        fine, fine_nfe = run(task, "unipc", "linear", TINY_FINE_STEPS)
        rows: list[dict[str, object]] = []

        # How smooth is the guided velocity in t at fixed x (the noise)?  One Euler step from t gives
        # v(x, t) = (x' - x) / dt through the same denoise path.  A trained model is smooth in t; a
        # random time embedding is not, and then every solver degrades to first order.
        def v_at(t: float) -> torch.Tensor:
            out = pipe.denoise(task.x, task.rows, task.cols, task.conditions,  # type: ignore[arg-type]
                               Guidance(task.txt_cfg, task.img_cfg), [t, t - 0.05], "euler")
            return (out - task.x) / -0.05

        roughness = {}
        for t in (0.9, 0.5, 0.1):
            v0, v1, v2 = v_at(t), v_at(t + 1e-3), v_at(t + 2e-3)
            roughness[str(t)] = {"d1_per_1e-3": _rel_l2(v1, v0),
                                 "d2_per_1e-3": float((v2 - 2 * v1 + v0).norm() / v0.norm())}

        def record(solver: str, spacing: str, steps: int, interval: tuple[float, float] | None,
                   out: torch.Tensor, n: int) -> dict[str, object]:
            row = {"solver": solver, "spacing": spacing, "steps": steps,
                   "cfg_interval": list(interval) if interval else None, "nfe": n,
                   "rel_l2": _rel_l2(out, ref), "rel_l2_fine": _rel_l2(out, fine),
                   "psnr": _psnr(decode(task, out), ref_img)}
            rows.append(row)
            return row

        for solver in TINY_SOLVERS:
            for spacing in SPACINGS:
                for steps in TINY_STEPS:
                    if steps == TINY_LONG and spacing != "linear":
                        continue
                    if (solver, spacing, steps) == ("euler", "linear", 50):
                        out, n = ref, ref_nfe
                    else:
                        out, n = run(task, solver, spacing, steps)
                    record(solver, spacing, steps, None, out, n)
        grid_seconds = time.perf_counter() - t_task

        # Guidance economy: CFG intervals on the best solver × spacing pairs (mean log deviation
        # over 8-15 steps, full CFG), on unipc/karras (part a's pick) and on Euler/linear.
        def pair_score(solver: str, spacing: str) -> float:
            sub = [r for r in rows if r["solver"] == solver and r["spacing"] == spacing
                   and r["steps"] in TINY_INTERVAL_STEPS]
            return sum(math.log(max(float(r["rel_l2"]), 1e-12)) for r in sub) / len(sub)

        pairs = sorted({(s, sp) for s in TINY_SOLVERS for sp in SPACINGS if s != "heun"},
                       key=lambda p: pair_score(*p))[: args.tiny_pairs]
        for extra in (("unipc", "karras"), ("euler", "linear")):
            if extra not in pairs:
                pairs.append(extra)
        for solver, spacing in pairs:
            for steps in TINY_INTERVAL_STEPS:
                for interval in TINY_INTERVALS:
                    out, n = run(task, solver, spacing, steps, interval)
                    record(solver, spacing, steps, interval, out, n)

        full = [r for r in rows if r["cfg_interval"] is None]
        ref_row = next(r for r in full if r["solver"] == "euler" and r["spacing"] == "linear" and r["steps"] == 50)

        def best(cands: list[dict[str, object]], budget: int) -> dict[str, object] | None:
            fit = [r for r in cands if int(r["nfe"]) <= budget and r is not ref_row]
            return min(fit, key=lambda r: float(r["rel_l2"])) if fit else None

        def euler_at(budget: int) -> dict[str, object] | None:
            fit = [r for r in full if r["solver"] == "euler" and r["spacing"] == "linear" and int(r["nfe"]) <= budget]
            return max(fit, key=lambda r: int(r["nfe"])) if fit else None

        per_budget = {b: {"best_full_cfg": best(full, b), "best_any": best(rows, b), "euler_linear": euler_at(b)}
                      for b in TINY_BUDGETS[task.name]}
        budget = TINY_FAST_BUDGET[task.name]
        fast = best(rows, budget)
        fast_full = best(full, budget)
        euler_same = euler_at(budget)
        euler_rows = sorted((r for r in full if r["solver"] == "euler" and r["spacing"] == "linear"),
                            key=lambda r: int(r["nfe"]))
        fixed = {}
        for solver, spacing, steps, interval in (("unipc", "karras", 12, None), ("unipc", "linear", 12, None),
                                                 ("dpmpp_2m", "karras", 12, None)):
            fixed[f"{solver}/{spacing}/{steps}"] = next(
                r for r in rows if (r["solver"], r["spacing"], r["steps"], r["cfg_interval"]) ==
                (solver, spacing, steps, interval))

        def euler_nfe_matching(row: dict[str, object] | None) -> int | None:
            """Fewest Euler/linear NFE (full CFG) whose deviation is no larger than row's."""
            if row is None:
                return None
            hit = next((r for r in euler_rows if float(r["rel_l2"]) <= float(row["rel_l2"])), None)
            return int(hit["nfe"]) if hit else None

        results[task.name] = {
            "size": [task.cols * 16, task.rows * 16],
            "tokens": task.rows * task.cols,
            "passes": task.passes,
            "cfg": {"txt_cfg": task.txt_cfg, "img_cfg": task.img_cfg},
            "reference": {"solver": "euler", "spacing": "linear", "steps": 50, "nfe": ref_nfe,
                          "schedule_head": [round(t, 5) for t in schedule(task, 50, "linear")[:3]],
                          "rel_l2_vs_fine": _rel_l2(ref, fine), "latent_norm": float(ref.norm())},
            "velocity_roughness": roughness,
            "fine": {"solver": "unipc", "spacing": "linear", "steps": TINY_FINE_STEPS, "nfe": fine_nfe},
            "rows": rows,
            "interval_pairs": [list(p) for p in pairs],
            "best_per_budget": per_budget,
            "fast": {"budget": budget, "best_any": fast, "best_full_cfg": fast_full, "euler_linear": euler_same,
                     "euler_nfe_matching_best_any": euler_nfe_matching(fast),
                     "euler_nfe_matching_best_full_cfg": euler_nfe_matching(fast_full),
                     "fixed_12_steps": fixed},
            "seconds": {"grid": round(grid_seconds, 1), "total": round(time.perf_counter() - t_task, 1)},
        }
    return {
        "machine": machine(),
        "model": {"kind": "tiny random Ovis-U1 (lite.model.tiny.make_tiny)", "seed": args.tiny_seed, "dtype": "float32",
                  "device": "cpu"},
        "noise_seed": args.seed,
        "shift_mu": "pipeline schedule for the resolution" if args.tiny_mu is None else args.tiny_mu,
        "metric": {"rel_l2": "||x - x_ref|| / ||x_ref|| of the packed latent before decode, x_ref = Euler/linear 50 "
                             "steps with full CFG",
                   "rel_l2_fine": f"same, against unipc/linear {TINY_FINE_STEPS} steps (full CFG)",
                   "psnr": "dB, decoded uint8 image vs the reference's (None = identical)",
                   "nfe": "DiT forwards per image, counted by OvisPipeline.denoise"},
        "generate_check": check,
        "tasks": results,
        "seconds": round(time.perf_counter() - t_start, 1),
    }


SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, object]]] = {
    "analytic": analytic_benchmark,
    "tiny": tiny_model_benchmark,
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


def _fmt_row(r: dict[str, object] | None) -> str:
    if r is None:
        return "-"
    iv = r["cfg_interval"]
    cfg = "full CFG" if iv is None else f"CFG t∈[{iv[0]}, {iv[1]}]"  # type: ignore[index]
    psnr = "inf" if r["psnr"] is None else f"{r['psnr']:.1f} dB"
    return (f"{r['solver']}/{r['spacing']} {r['steps']} steps, {cfg}: NFE {r['nfe']}, rel L2 {r['rel_l2']:.4f} "
            f"(vs fine {r['rel_l2_fine']:.4f}), PSNR {psnr}")


def _print_tiny(res: dict[str, object]) -> None:
    print(f"\n# tiny: {res['model']}, noise seed {res['noise_seed']}, shift {res['shift_mu']}, {res['machine']}")
    print(f"# generate() check: {res['generate_check']}")
    for name, t in res["tasks"].items():  # type: ignore[union-attr]
        rows = t["rows"]
        print(f"\n## {name} {t['size'][0]}x{t['size'][1]} ({t['tokens']} tokens, {t['passes']} passes, {t['cfg']})")
        print(f"reference {t['reference']}")
        print("velocity change in t at fixed x (relative, per Δt = 1e-3; 2nd difference):",
              {k: (round(v['d1_per_1e-3'], 4), round(v['d2_per_1e-3'], 4)) for k, v in t["velocity_roughness"].items()})
        print(f"\nrel L2 to the reference, full CFG (columns = steps; NFE = {t['passes']} × solver NFE)")
        print(f"{'solver':9s} {'spacing':8s} " + " ".join(f"{n:>7d}" for n in TINY_STEPS))
        for solver in TINY_SOLVERS:
            for spacing in SPACINGS:
                cells = {r["steps"]: r["rel_l2"] for r in rows if r["solver"] == solver and r["spacing"] == spacing
                         and r["cfg_interval"] is None}
                print(f"{solver:9s} {spacing:8s} " + " ".join(
                    f"{cells[n]:7.4f}" if n in cells else f"{'-':>7s}" for n in TINY_STEPS))
        print(f"\nCFG intervals (rel L2 / NFE; columns = steps) on {t['interval_pairs']}")
        for solver, spacing in t["interval_pairs"]:
            for iv in TINY_INTERVALS:
                cells = {r["steps"]: r for r in rows if r["solver"] == solver and r["spacing"] == spacing
                         and r["cfg_interval"] == list(iv)}
                print(f"{solver:9s} {spacing:8s} [{iv[0]:.1f},{iv[1]:.1f}] " + " ".join(
                    f"{cells[n]['rel_l2']:7.4f}/{cells[n]['nfe']:<3d}" for n in TINY_INTERVAL_STEPS))
        print("\nbest per NFE budget")
        for b, d in t["best_per_budget"].items():
            print(f"  ≤{int(b):>3d}  any:   {_fmt_row(d['best_any'])}")
            print(f"        full:  {_fmt_row(d['best_full_cfg'])}")
            print(f"        euler: {_fmt_row(d['euler_linear'])}")
        f = t["fast"]
        print(f"\nfast settings (NFE ≤ {f['budget']}):")
        print(f"  best:          {_fmt_row(f['best_any'])}  = Euler at {f['euler_nfe_matching_best_any']} NFE")
        print(f"  best full CFG: {_fmt_row(f['best_full_cfg'])}  = Euler at {f['euler_nfe_matching_best_full_cfg']} NFE")
        print(f"  Euler:         {_fmt_row(f['euler_linear'])}")
        for k, r in f["fixed_12_steps"].items():
            print(f"  {k:14s} {_fmt_row(r)}")
        print(f"({t['seconds']} s)")
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
    p.add_argument("--tiny-size", type=int, default=128, help="tiny: image side in pixels (t2i and edit)")
    p.add_argument("--tiny-seed", type=int, default=0, help="tiny: seed of the random checkpoint")
    p.add_argument("--tiny-mu", type=float, default=None,
                   help="tiny: μ shift for every schedule (default: the pipeline's own for the resolution)")
    p.add_argument("--tiny-pairs", type=int, default=1,
                   help="tiny: best solver × spacing pairs that get the CFG-interval sweep "
                        "(plus unipc/karras and euler/linear)")
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
            elif name == "tiny":
                _print_tiny(res)
            else:
                print(json.dumps({name: res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
