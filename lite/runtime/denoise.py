"""The denoising loop of Ovis-U1: Yak velocities under 2-pass (t2i) or 3-pass (edit) classifier-free
guidance, integrated by any solver of `lite.sampling` (spec §3.8)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

from lite.errors import InputError
from lite.model import latents
from lite.model.modeling_yak import RefinedText, YakTransformer
from lite.model.config import YakConfig
from lite.sampling import SOLVERS, SPACINGS, Guidance, make_timesteps, reference_schedule, sample, time_shift_mu
from lite.validation import check_interval, check_steps

#: "the preset's" sampling (or the reference's 50 Euler steps without a preset)
PRESET: Literal["preset"] = "preset"
#: Called after each denoising step with the current (unpacked, scaled) latent; returning False stops the
#: run quietly: the latent as it stands is decoded and the result is marked cancelled.
StepCallback = Callable[[int, int, torch.Tensor], "bool | None"]


class Denoised(NamedTuple):
    """The packed latent a denoise reached, the Yak evaluations it took, and whether the callback stopped it."""

    latent: torch.Tensor
    nfe: int
    stopped: bool


class _Stop(Exception):
    """Raised from the solver's step hook to leave the loop with the latent reached (never escapes)."""

    def __init__(self, latent: torch.Tensor) -> None:
        super().__init__("stopped by the step callback")
        self.latent = latent


@dataclass
class Condition:
    """A refined LLM condition plus, for edits, the packed condition-image latent."""

    text: RefinedText
    cond_latent: torch.Tensor | None = None
    cond_ids: torch.Tensor | None = None
    table: torch.Tensor | None = None  # RoPE table, built on first use and reused every step


def guided_denoise(yak: YakTransformer, x: torch.Tensor, rows: int, cols: int, conditions: dict[str, Condition],
                   guidance: Guidance, timesteps: list[float], solver: str, on_step: Callable[[], None],
                   callback: StepCallback | None = None) -> Denoised:
    """The final packed latent (or the one reached when the callback returned False) and its Yak evaluations.

    t2i: v = v_nb + s_t (v_c - v_nb); edit: v = v_nb + s_i (v_nt - v_nb) + s_t (v_c - v_nt); outside the
    guidance interval only the conditional pass runs.
    """
    img_ids = latents.image_ids(rows, cols, device=x.device)
    calls = 0

    def f(x_t: torch.Tensor, t_vec: torch.Tensor, cond: Condition) -> torch.Tensor:
        nonlocal calls
        calls += 1
        ids = img_ids if cond.cond_latent is None else torch.cat([img_ids, cond.cond_ids], 1)
        if cond.table is None:
            cond.table = yak.rope(cond.text.txt_fea.shape[1], ids)
        return yak(x_t, img_ids, cond.text, t_vec, cond.cond_latent, cond.cond_ids, table=cond.table)

    def velocity(x_t: torch.Tensor, t: float) -> torch.Tensor:
        t_vec = torch.full((x_t.shape[0],), t, dtype=x_t.dtype, device=x_t.device)
        v_c = f(x_t, t_vec, conditions["cond"])
        if not guidance.active(t):
            return v_c
        v_nb = f(x_t, t_vec, conditions["no_both"])
        if "no_txt" not in conditions:
            return v_nb + guidance.txt_cfg * (v_c - v_nb)
        v_nt = f(x_t, t_vec, conditions["no_txt"])
        return v_nb + guidance.img_cfg * (v_nt - v_nb) + guidance.txt_cfg * (v_c - v_nt)

    total = len(timesteps) - 1

    def step(i: int, _t: float, current: torch.Tensor) -> None:
        on_step()
        if callback is not None and callback(i + 1, total, latents.unpack(current, rows, cols)) is False:
            raise _Stop(current)

    try:
        out = sample(velocity, x, None, solver=solver, timesteps=timesteps, callback=step)
    except _Stop as stop:
        return Denoised(stop.latent, calls, True)
    return Denoised(out, calls, False)


def flow_timesteps(cfg: YakConfig, steps: int, n_tokens: int, spacing: str = "linear") -> list[float]:
    """The reference's shifted schedule for `linear`; the same μ shift for other spacings."""
    if spacing == "linear":
        return reference_schedule(steps, n_tokens, cfg.base_shift, cfg.max_shift, shift=cfg.timestep_shift)
    mu = time_shift_mu(n_tokens, cfg.base_shift, cfg.max_shift) if cfg.timestep_shift else None
    return list(make_timesteps(steps, spacing, mu))


def resolve_sampling(defaults: dict[str, Any], steps: int | None, solver: str | None, spacing: str | None,
                     cfg_interval: Any) -> tuple[int, str, str, tuple[float, float] | None]:
    """The sampler a call runs: what it was told, else `defaults` (the preset's or the reference's), checked."""
    steps = defaults["steps"] if steps is None else steps
    solver = defaults["solver"] if solver is None else solver
    spacing = defaults["spacing"] if spacing is None else spacing
    interval = defaults["cfg_interval"] if isinstance(cfg_interval, str) and cfg_interval == PRESET else cfg_interval
    interval = check_interval("cfg_interval", interval)
    check_steps(steps)
    if solver not in SOLVERS:
        raise InputError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if spacing not in SPACINGS:
        raise InputError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return steps, solver, spacing, interval
