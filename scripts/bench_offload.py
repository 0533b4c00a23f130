"""Benchmark the offloader on a toy stack of 12 Linear(d -> 4d -> d) blocks (default d=1536).

CPU: overhead of the simulate path (placeholders + a host-to-"device" copy per onload) against
the fully resident run, and of the account-only path (hooks alone). CUDA (`--device cuda`): real
paging from pinned memory on a side stream with prefetch depth 0/1/2 against resident, with
`torch.cuda.max_memory_allocated` next to the ledger's peak.

`--ovis`: the full-size Ovis-U1-3B architecture instead of the toy (see docs/offload.md).

1. Planned peaks, on a `meta` model (no weight is read): for budgets of 8, 6, 4, 3 and 2 GiB, the
   tasks understand / t2i 1024x1024 / edit 1024x1024 and two precision layouts (bf16 = the
   `reference` quant policy with its fp32 untiled VAE and 50 Euler steps; `balanced`), the plan of
   `lite.runtime.planning.plan_preset` with that budget: planned peak (weights + activations), per-phase
   peaks, resident weight bytes, paged units, prefetch depth, and which Yak units page inside the
   denoise loop. A budget no plan fits records the BudgetError's minimum (and the phase setting it).
2. CPU (default): a full-size Yak (random bf16 weights) driven like the denoise loop (2 CFG passes
   per step, Euler update, a small image so that it finishes) fully resident, then under the
   offloader in simulate mode (weights really dropped and re-copied on every onload) at budgets
   that page. Seconds per step, ratio to resident, onloads and bytes copied per step (ledger). On a
   CPU "paging" is a memcpy: this measures the offloader's overhead, not PCIe.
   `--device cuda` (untested here): the same loop at 1024x1024, resident against real paging at
   the planner's budget on emulated 8/4/2 GiB cards (`torch.cuda.set_per_process_memory_fraction`),
   with `torch.cuda.max_memory_allocated` per run.

    python scripts/bench_offload.py --ovis --threads 2            # tables (plans + CPU timing)
    python scripts/bench_offload.py --ovis --json --threads 2
    python scripts/bench_offload.py --ovis --no-timing            # plans only (~20 s)
    python scripts/bench_offload.py --ovis --device cuda --json   # GPU check, 1024x1024
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchtools, also when imported by a test

from offload import attach_offload, min_budget_bytes, plan, units_for  # noqa: E402
from offload.tensors import copy_to  # noqa: E402
from benchtools import sync, time_calls  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, d: int, n: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def _time(fn, device: torch.device, repeats: int) -> list[float]:
    return time_calls(fn, device, repeats)  # the warm-up call also learns the execution order


def _stats(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times)}


# ---------------------------------------------------------------------------------------------
# --ovis: the full-size Ovis-U1-3B architecture (plans on a meta model; a real Yak for timing).
# ---------------------------------------------------------------------------------------------

GiB = 1 << 30
OVIS_BUDGETS_GIB = (8, 6, 4, 3, 2)
OVIS_TASKS = ("understand", "t2i", "edit")
OVIS_LAYOUTS = {"bf16": "reference", "balanced": "balanced"}  # layout -> quant policy / preset
T2I_PASSES = 2  # CFG passes per denoising step (cond, no_both)


def _llm_group(unit_bytes: dict[str, int]) -> int | None:
    for name in unit_bytes:
        if name.startswith("llm.model.layers.0"):
            rest = name[len("llm.model.layers."):]
            return 1 if "-" not in rest else int(rest.split("-")[1]) + 1
    return None


def ovis_plans(budgets_gib: tuple[float, ...] = OVIS_BUDGETS_GIB, width: int = 1024, height: int = 1024,
               device_type: str = "cuda") -> list[dict[str, object]]:
    """One row per (layout, budget, task): the plan `plan_preset` makes, or the refusal's minimum."""
    import dataclasses

    from lite.model.config import PreprocessorConfig, parse_config
    from lite.runtime.planning import plan_preset
    from lite.runtime.presets import PRESETS
    from lite.model.tiny import real_config_template
    from offload import BudgetError

    cfg, pp = parse_config(real_config_template()), PreprocessorConfig()
    rows: list[dict[str, object]] = []
    for layout, preset_name in OVIS_LAYOUTS.items():
        for b in budgets_gib:
            budget = int(b * GiB)
            # `reference` never offloads on its own: keep its precision, VAE and sampling, page inside the budget.
            preset = dataclasses.replace(PRESETS[preset_name], budget_bytes=budget, offload=True)
            for task in OVIS_TASKS:
                row: dict[str, object] = {"layout": layout, "precision": preset.precision.name, "budget_bytes": budget,
                                          "task": task, "size": None if task == "understand" else f"{width}x{height}"}
                try:
                    p = plan_preset(preset, cfg, pp, task, width, height, device_type, budget)
                except BudgetError as exc:
                    row.update(fits=False, min_budget_bytes=exc.min_budget_bytes, min_budget_phase=exc.phase)
                    rows.append(row)
                    continue
                yak_paged = [u for u in p.paged_units if u.startswith("yak.")]
                row.update(
                    fits=True, planned_peak_bytes=p.planned_peak_bytes, phase_peaks=p.phase_peaks,
                    phase_weight_peaks=p.phase_weight_peaks, activation_bytes=p.activation_bytes,
                    resident_weight_bytes=p.resident_weight_bytes,
                    total_weight_bytes=sum(p.unit_bytes.values()), n_units=len(p.unit_bytes),
                    n_paged_units=len(p.paged_units), prefetch_depth=p.prefetch_depth, batch_cfg=p.batch_cfg,
                    llm_group=_llm_group(p.unit_bytes), min_budget_bytes=p.min_budget_bytes,
                    within_budget=p.planned_peak_bytes <= budget,
                    denoise_pages_yak=bool(yak_paged), denoise_paged_units=yak_paged,
                    denoise_paged_bytes_per_eval=sum(p.unit_bytes[u] for u in yak_paged),
                    paged_bytes_per_generation=p.paged_bytes_per_generation,
                )
                rows.append(row)
    return rows


def build_yak(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> nn.Module:
    """Full-size Yak (real config) with random weights: meta -> to_empty -> fill from one random pool.

    Each tensor is a scaled window of a shared N(0, 1) pool (memcpy speed; `normal_` on 1.1B bf16
    values takes ~30 s on two cores). The values only have to be finite and of a sane scale: this is
    for timing and bit-exactness checks, not for images.
    """
    import math

    from lite.model.config import parse_config
    from lite.model.modeling_yak import YakTransformer
    from lite.model.tiny import real_config_template

    cfg = parse_config(real_config_template()).yak
    with torch.device("meta"):
        model = YakTransformer(cfg)
    model = model.to(dtype).to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    biggest = max(t.numel() for t in model.state_dict().values())
    pool = torch.randn(biggest + 4096, generator=gen).to(dtype)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            off = int(torch.randint(0, 4096, (1,), generator=gen))
            scale = 0.02 if t.ndim < 2 else 1.0 / math.sqrt(t.shape[1])
            t.view(-1).copy_(pool[off:off + t.numel()]).mul_(scale)
    return model


def _yak_units(yak: nn.Module) -> list:
    from offload import UnitSpec, build_units

    return build_units({"yak": yak}, [UnitSpec("yak", "double_blocks", 1, ("denoise",)),
                                      UnitSpec("yak", "single_blocks", 3, ("denoise",)),
                                      UnitSpec("yak", None, 1, ("denoise",))])


class _DenoiseLoop:
    """Inputs of a t2i denoise loop and the loop itself: per step, 2 CFG passes and an Euler update."""

    def __init__(self, yak: nn.Module, size: int, text_tokens: int, steps: int, device: torch.device,
                 seed: int = 1) -> None:
        from lite.model.latents import image_ids
        from lite.model.modeling_yak import RefinedText

        self.yak, self.device = yak, device
        cfg = yak.config
        gen = torch.Generator().manual_seed(seed)
        side = size // 16
        dt = torch.bfloat16
        self.x0 = torch.randn(1, side * side, cfg.in_channels, generator=gen).to(dt).to(device)
        self.ids = image_ids(side, side).to(device)
        self.conds = [RefinedText(torch.randn(1, text_tokens, cfg.hidden_size, generator=gen).to(dt).to(device),
                                  torch.randn(1, cfg.hidden_size, generator=gen).to(dt).to(device))
                      for _ in range(T2I_PASSES)]
        self.table = yak.rope(text_tokens, self.ids.cpu()).to(device)
        self.ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
        self.image_tokens, self.text_tokens = side * side, text_tokens

    def velocity(self, x: torch.Tensor, t: float, cond: int) -> torch.Tensor:
        t_vec = torch.full((1,), t, dtype=x.dtype, device=x.device)
        return self.yak(x, self.ids, self.conds[cond], t_vec, table=self.table)

    def step(self, x: torch.Tensor, i: int, txt_cfg: float = 5.0) -> torch.Tensor:
        t, t_next = self.ts[i], self.ts[i + 1]
        v_c = self.velocity(x, t, 0)
        v_nb = self.velocity(x, t, 1)
        return x + (t_next - t) * (v_nb + txt_cfg * (v_c - v_nb))

    @torch.inference_mode()
    def run(self, warmup_passes: int, on_step=None) -> tuple[torch.Tensor, list[float]]:
        """`warmup_passes` conditional passes (the offloader learns its order), then the timed steps."""
        for _ in range(warmup_passes):
            self.velocity(self.x0, self.ts[0], 0)
        if on_step is not None:
            on_step(-1)
        x, times = self.x0, []
        for i in range(len(self.ts) - 1):
            sync(self.device)
            t0 = time.perf_counter()
            x = self.step(x, i)
            sync(self.device)
            times.append(time.perf_counter() - t0)
            if on_step is not None:
                on_step(i)
        return x, times


def _yak_activation(size: int, device_type: str) -> dict[str, int]:
    from lite.model.config import parse_config
    from lite.model.memory_profile import Workload, denoise_activation
    from lite.model.tiny import real_config_template

    cfg = parse_config(real_config_template())
    return {"denoise": denoise_activation(cfg, Workload("t2i", width=size, height=size, device_type=device_type))}


def _timing_budgets(spec: str, units: list, act: dict[str, int]) -> list[tuple[str, int]]:
    from offload import min_budget_bytes

    out = []
    for item in spec.split(","):
        item = item.strip()
        if item == "min":
            out.append(("min", min_budget_bytes(units, act)))
        elif item:
            out.append((f"{float(item):g}GiB", int(float(item) * GiB)))
    return out


def ovis_timing(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """Seconds per denoise step of a full-size Yak: resident, then paged by our offloader."""
    from offload import attach_offload, plan

    size = args.ovis_size or (1024 if device.type == "cuda" else 128)
    t0 = time.perf_counter()
    yak = build_yak()
    build_s = time.perf_counter() - t0
    units = _yak_units(yak)
    act = _yak_activation(size, device.type)
    weight_bytes = sum(u.nbytes for u in units)
    out: dict[str, object] = {
        "device": str(device), "size": f"{size}x{size}", "steps": args.ovis_steps, "passes_per_step": T2I_PASSES,
        "warmup_passes": args.ovis_warmup, "threads": torch.get_num_threads(), "build_s": build_s,
        "yak_weight_bytes": weight_bytes, "n_units": len(units),
        "unit_bytes": {"double_block": units[0].nbytes, "single_group_of_3": units[len(yak.double_blocks)].nbytes,
                       "rest": units[-1].nbytes},
        "activation_bytes": act, "runs": {},
    }
    runs: dict[str, dict[str, object]] = out["runs"]  # type: ignore[assignment]
    cuda = device.type == "cuda"
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # the memory-fraction API wants an index
    total = torch.cuda.get_device_properties(device).total_memory if cuda else None

    # Resident: the weights on the execution device for the whole loop.
    if cuda:
        yak.to(device)
        torch.cuda.reset_peak_memory_stats(device)
    loop = _DenoiseLoop(yak, size, args.ovis_text_tokens, args.ovis_steps, device)
    out.update(image_tokens=loop.image_tokens, text_tokens=loop.text_tokens)
    ref, times = loop.run(args.ovis_warmup)
    runs["resident"] = {"median_s_per_step": statistics.median(times), "step_s": times,
                        "loadavg_1min": os.getloadavg()[0]}
    if cuda:
        runs["resident"]["max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        yak.to("cpu")
        torch.cuda.empty_cache()
        units = _yak_units(yak)  # same slots; re-sized from the host tensors
    resident_s = statistics.median(times)
    if not cuda:
        # What one onload costs at most here: a fresh host copy of every Yak tensor (simulate's copy).
        t1 = time.perf_counter()
        copies = [copy_to(t, "cpu") for t in list(yak.parameters()) + list(yak.buffers())]
        copy_s = time.perf_counter() - t1
        del copies
        out["host_copy_GBps"] = weight_bytes / copy_s / 1e9

    for label, budget in _timing_budgets(args.ovis_budgets, units, act):
        try:
            p = plan(budget, units, act, max_prefetch_depth=args.ovis_prefetch)
        except Exception as exc:  # BudgetError
            runs[label] = {"budget_bytes": budget, "error": str(exc)}
            continue
        row: dict[str, object] = {
            "budget_bytes": budget, "planned_peak_bytes": p.planned_peak_bytes,
            "resident_weight_bytes": p.resident_weight_bytes, "n_paged_units": len(p.paged_units),
            "paged_units": p.paged_units, "prefetch_depth": p.prefetch_depth,
            "planned_paged_bytes_per_pass": sum(p.unit_bytes[u] for u in p.paged_units),
        }
        runs[label] = row
        if not p.paged_units and not cuda:
            row["note"] = "everything resident: no paging in the loop, not timed"
            continue
        if cuda:
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)  # emulate a card
        off = attach_offload(units, p, device, simulate=not cuda)
        try:
            off.enter_phase("denoise")
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            marks: list[tuple[int, int]] = []  # ledger counters after the warm-up and after each step
            off.ledger.reset_peak()

            def note(_i: int) -> None:
                marks.append((off.ledger.onloads, off.ledger.onloaded_bytes))

            x, times = loop.run(args.ovis_warmup, note)
            per_step = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])]
            med = statistics.median(times)
            row.update(median_s_per_step=med, step_s=times, ratio_to_resident=med / resident_s,
                       loadavg_1min=os.getloadavg()[0],
                       onloads_per_step=statistics.median(n for n, _ in per_step),
                       onloaded_bytes_per_step=statistics.median(b for _, b in per_step),
                       ledger_peak_bytes=off.ledger.peak_bytes, bitwise_equal_to_resident=bool(torch.equal(x, ref)),
                       max_abs_diff=float((x.float() - ref.float()).abs().max()))
            if cuda:
                row["max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
                row["emulated_card_bytes"] = budget
            else:
                row["copy_s_per_step_at_measured_rate"] = row["onloaded_bytes_per_step"] / 1e9 / out["host_copy_GBps"]
        except torch.OutOfMemoryError as exc:
            row["error"] = f"OOM on the emulated {budget / GiB:.2f} GiB card: {str(exc).splitlines()[0]}"
        finally:
            off.remove()
            if cuda:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
                torch.cuda.empty_cache()
    if not cuda and args.ovis_resident_after:
        # Bracket: a second resident run after the paged ones (the machine is shared; load drifts).
        _, times = loop.run(args.ovis_warmup)
        runs["resident_after"] = {"median_s_per_step": statistics.median(times), "step_s": times,
                                  "loadavg_1min": os.getloadavg()[0],
                                  "ratio_to_resident": statistics.median(times) / resident_s}
    return out


def _gib(n: object) -> str:
    return f"{n / GiB:.2f}" if isinstance(n, (int, float)) else "-"


def print_ovis(result: dict[str, object]) -> None:
    rows = result.get("plans") or []
    if rows:
        print("Planned peaks (GiB; weights + activations; 1024x1024 for t2i/edit; planner's CUDA model)")
        print(f"{'layout':9s} {'budget':>6s} {'task':10s} {'peak':>6s} {'cond':>6s} {'denoise':>7s} {'decode':>6s} "
              f"{'res.W':>6s} {'paged':>7s} {'depth':>5s} {'llm_g':>5s}  denoise paging")
        for r in rows:  # type: ignore[union-attr]
            head = f"{r['layout']:9s} {_gib(r['budget_bytes']):>6s} {r['task']:10s}"
            if not r["fits"]:
                print(f"{head} refused: minimum {_gib(r['min_budget_bytes'])} GiB (phase {r['min_budget_phase']})")
                continue
            pk = r["phase_peaks"]
            paging = (f"{len(r['denoise_paged_units'])} Yak units, {r['denoise_paged_bytes_per_eval'] / 2**20:.0f} MiB/eval"
                      if r["denoise_pages_yak"] else "none")
            print(f"{head} {_gib(r['planned_peak_bytes']):>6s} {_gib(pk.get('conditions')):>6s} "
                  f"{_gib(pk.get('denoise')):>7s} {_gib(pk.get('decode')):>6s} {_gib(r['resident_weight_bytes']):>6s} "
                  f"{r['n_paged_units']:>3d}/{r['n_units']:<3d} {r['prefetch_depth']:>5d} {str(r['llm_group']):>5s}  {paging}")
    timing = result.get("timing")
    if timing:
        t = timing  # type: ignore[assignment]
        print(f"\nYak denoise loop on {t['device']}: {t['size']} ({t['image_tokens']} image + {t['text_tokens']} text "
              f"tokens), {t['passes_per_step']} passes/step, {t['steps']} timed steps, threads {t['threads']}; "
              f"Yak {_gib(t['yak_weight_bytes'])} GiB in {t['n_units']} units"
              + (f"; host copy {t['host_copy_GBps']:.1f} GB/s" if "host_copy_GBps" in t else ""))
        print(f"{'run':10s} {'budget':>6s} {'s/step':>8s} {'x res.':>6s} {'paged':>5s} {'onloads':>7s} "
              f"{'MiB/step':>8s} {'copy_s':>6s} {'ledger':>6s} {'plan':>6s} {'load':>5s}  equal")
        for name, r in t["runs"].items():
            if "error" in r:
                print(f"{name:10s} {_gib(r.get('budget_bytes')):>6s} {r['error']}")
                continue
            if "median_s_per_step" not in r:
                print(f"{name:10s} {_gib(r['budget_bytes']):>6s} {r.get('note', '')}")
                continue
            print(f"{name:10s} {_gib(r.get('budget_bytes')):>6s} {r['median_s_per_step']:>8.2f} "
                  f"{r.get('ratio_to_resident', 1.0):>6.3f} {r.get('n_paged_units', 0):>5d} "
                  f"{r.get('onloads_per_step', 0):>7g} {r.get('onloaded_bytes_per_step', 0) / 2**20:>8.0f} "
                  f"{r.get('copy_s_per_step_at_measured_rate', 0):>6.2f} "
                  f"{_gib(r.get('ledger_peak_bytes')):>6s} {_gib(r.get('planned_peak_bytes')):>6s} "
                  f"{r.get('loadavg_1min', 0):>5.2f}  "
                  f"{r.get('bitwise_equal_to_resident', '-')}"
                  + (f"  max_alloc {_gib(r['max_allocated_bytes'])}" if "max_allocated_bytes" in r else ""))


def run_ovis(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    result: dict[str, object] = {"section": "ovis"}
    try:
        result["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    t0 = time.perf_counter()
    if not args.no_plans:
        result["plans"] = ovis_plans()
    result["plans_s"] = time.perf_counter() - t0
    if not args.no_timing:
        result["timing"] = ovis_timing(args, device)
    try:
        result["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    result["total_s"] = time.perf_counter() - t0
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--passes", type=int, default=2, help="forwards per timed run (denoise-loop passes)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--json", action="store_true")
    ovis = ap.add_argument_group("--ovis: the full-size Ovis-U1-3B architecture (see the module docstring)")
    ovis.add_argument("--ovis", action="store_true", help="run the Ovis-U1 section instead of the toy stack")
    ovis.add_argument("--no-plans", action="store_true", help="skip the planned-peak table")
    ovis.add_argument("--no-timing", action="store_true", help="skip the Yak denoise-loop timing")
    ovis.add_argument("--ovis-size", type=int, default=0, help="image side for the timing (CPU 128, CUDA 1024)")
    ovis.add_argument("--ovis-text-tokens", type=int, default=64)
    ovis.add_argument("--ovis-steps", type=int, default=0, help="timed denoise steps, 2 passes each (CPU 2, CUDA 5)")
    ovis.add_argument("--ovis-resident-after", type=int, default=1, help="CPU: time resident again at the end")
    ovis.add_argument("--ovis-warmup", type=int, default=1, help="untimed passes first (learns the order)")
    ovis.add_argument("--ovis-prefetch", type=int, default=1, help="max prefetch depth of the timing plans")
    ovis.add_argument("--ovis-budgets", default=None,
                      help="timing budgets in GiB, 'min' = Yak-only minimum (CPU: min,1,2,3; CUDA: 8,4,2,min)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.ovis:
        args.ovis_steps = args.ovis_steps or (5 if device.type == "cuda" else 2)
        if args.ovis_budgets is None:
            args.ovis_budgets = "8,4,2,min" if device.type == "cuda" else "min,1,2,3"
        result = run_ovis(args, device)
        print(json.dumps(result, indent=2)) if args.json else print_ovis(result)
        return
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = Stack(args.dim, args.blocks).to(dtype).eval()
    x = torch.randn(args.tokens, args.dim, dtype=dtype)
    units = units_for(model, "stack", "block")
    act = {"default": 4 * x.numel() * x.element_size() * 4}
    weight_bytes = sum(u.nbytes for u in units)

    def run() -> torch.Tensor:
        with torch.no_grad():
            h = x.to(device)
            for _ in range(args.passes):
                h = model(h)
            return h

    result: dict[str, object] = {
        "device": str(device), "dim": args.dim, "blocks": args.blocks, "tokens": args.tokens,
        "dtype": args.dtype, "passes": args.passes, "threads": torch.get_num_threads(),
        "weight_bytes": weight_bytes, "block_bytes": units[0].nbytes, "runs": {},
    }
    runs: dict[str, object] = result["runs"]  # type: ignore[assignment]
    if device.type == "cpu":
        ref = run()
        runs["resident"] = _stats(_time(run, device, args.repeats))
        for name, kwargs in (("account", {}), ("simulate", {"simulate": True}),
                             ("simulate_nocopy", {"simulate": True, "copy_on_onload": False})):
            p = plan(min_budget_bytes(units, act), units, act, max_prefetch_depth=1)
            off = attach_offload(units, p, device, **kwargs)
            try:
                assert torch.equal(run(), ref)
                off.ledger.reset_peak()
                stats = _stats(_time(run, device, args.repeats))
                stats["ledger_peak_bytes"] = off.ledger.peak_bytes
                stats["planned_peak_bytes"] = p.planned_peak_bytes
                stats["overhead_vs_resident"] = stats["median_s"] / runs["resident"]["median_s"] - 1  # type: ignore[index]
                runs[name] = stats
            finally:
                off.remove()
    else:
        model.to(device)
        ref = run()
        torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
        runs["resident"] = _stats(_time(run, device, args.repeats))
        if device.type == "cuda":
            runs["resident"]["max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)  # type: ignore[index]
        model.to("cpu")
        for depth in (0, 1, 2):
            budget = min_budget_bytes(units, act) + depth * units[0].nbytes
            p = plan(budget, units, act, max_prefetch_depth=depth)
            off = attach_offload(units, p, device)
            try:
                out = run()
                sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                stats = _stats(_time(run, device, args.repeats))
                stats.update(prefetch_depth=p.prefetch_depth, planned_peak_bytes=p.planned_peak_bytes,
                             ledger_peak_bytes=off.ledger.peak_bytes, max_abs_diff=float((out - ref).abs().max()),
                             slowdown_vs_resident=stats["median_s"] / runs["resident"]["median_s"])  # type: ignore[index]
                if device.type == "cuda":
                    stats["max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
                h2d = off.ledger.onloaded_bytes
                stats["onloaded_bytes_total"] = h2d
                runs[f"paged_depth{depth}"] = stats
            finally:
                off.remove()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, stats in runs.items():
            print(f"{name:16s} " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in stats.items()))  # type: ignore[union-attr]


if __name__ == "__main__":
    main()
