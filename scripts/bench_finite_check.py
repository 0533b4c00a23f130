"""Cost of the load-time finiteness check (lite.model.shards.first_non_finite) beside the cast it sits next to.

Ratios in one process, interleaved, median of N rounds: the check on a bf16 tensor of a full-size
width (Ovis-U1's LLM MLP weight, 6144 x 2048, and the Yak MLP, 6144 x 1536), the naive
`isfinite().all()`, and the casts the loader does (bf16 -> fp32 for fp32 components, bf16 -> fp16).

    python scripts/bench_finite_check.py [--rounds 15] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from lite.model.shards import first_non_finite


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"CPU: {cpu}, torch threads: {torch.get_num_threads()}, torch {torch.__version__}")
    gen = torch.Generator().manual_seed(0)
    for shape in ((6144, 2048), (6144, 1536)):
        w = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        cases = {
            "check (ours)": lambda: first_non_finite(w),
            "sum(fp32) check": lambda: bool(torch.isfinite(w.sum(dtype=torch.float32))),
            "isfinite().all()": lambda: bool(torch.isfinite(w).all()),
            "cast bf16->fp32": lambda: w.to(torch.float32),
            "cast bf16->fp16": lambda: w.to(torch.float16),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for fn in cases.values():
            fn()  # warm up
        for _ in range(args.rounds):
            for name, fn in cases.items():
                times[name].append(timed(fn))
        med = {k: statistics.median(v) for k, v in times.items()}
        base = med["cast bf16->fp32"]
        print(f"bf16 {shape[0]}x{shape[1]} ({w.numel() / 1e6:.1f} M elements):")
        for name, t in med.items():
            print(f"  {name:18s} {t * 1e3:8.2f} ms  {t / base:5.2f}x the bf16->fp32 cast")


if __name__ == "__main__":
    main()
