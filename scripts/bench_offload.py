"""Benchmark the offloader on a toy stack of 12 Linear(d -> 4d -> d) blocks (default d=1536).

CPU: overhead of the simulate path (placeholders + a host-to-"device" copy per onload) against
the fully resident run, and of the account-only path (hooks alone). CUDA (`--device cuda`): real
paging from pinned memory on a side stream with prefetch depth 0/1/2 against resident, with
`torch.cuda.max_memory_allocated` next to the ledger's peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offload import attach_offload, min_budget_bytes, plan, units_for  # noqa: E402


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _time(fn, device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up (learns the execution order)
    out = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return out


def _stats(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times)}


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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
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
                _sync(device)
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
