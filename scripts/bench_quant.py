"""Benchmark quant formats/backends on single large linears: bytes, error, speed, quantize time.

Usage: python scripts/bench_quant.py [--json] [--repeats N] [--shapes 4096x4096,6144x2048]
Shapes are out x in (2048x6144 in the brief means in=2048, out=6144, i.e. an MLP up-projection).
Reference is the fp32 layer; relerr = ||y - y_fp32|| / ||y_fp32|| on Gaussian x and W*0.02.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from offload.accounting import module_nbytes  # noqa: E402
from quant import QuantSpec, layer_kind, layout_nbytes, quantize_linear_from_weight  # noqa: E402

CASES: list[tuple[str, QuantSpec]] = [
    ("fp32 dense", QuantSpec("none")),
    ("bf16 dense", QuantSpec("bf16")),
    ("nf4 bnb", QuantSpec("nf4")),
    ("nf4 bnb dq", QuantSpec("nf4", double_quant=True)),
    ("fp4 bnb", QuantSpec("fp4")),
    ("int4 quanto", QuantSpec("int4")),
    ("int8 quanto", QuantSpec("int8")),
    ("fp8 quanto", QuantSpec("fp8")),
    ("int8 torch", QuantSpec("int8", backend="torch")),
]


def _input_dtype(spec: QuantSpec) -> torch.dtype:
    """Activations in the layer's own dtype (fp32 for the untouched reference layer)."""
    return {"none": torch.float32, "fp16": torch.float16}.get(spec.format, spec.compute_dtype)


def _time_ms(fn, repeats: int) -> float:
    fn()  # warm-up (bnb/quanto pick kernels on first call)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) * 1000 / repeats


@torch.no_grad()
def bench_shape(out_f: int, in_f: int, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    x1 = torch.randn(1, in_f, generator=g)
    x256 = torch.randn(256, in_f, generator=g)
    ref = x256 @ w.T
    rows = []
    for label, spec in CASES:
        t0 = time.perf_counter()
        layer = quantize_linear_from_weight(w, None, spec)
        q_ms = (time.perf_counter() - t0) * 1000
        kind = layer_kind(layer)
        in_dtype = _input_dtype(spec)
        a1, a256 = x1.to(in_dtype), x256.to(in_dtype)
        y = layer(a256).float()
        nbytes = module_nbytes(layer)
        lay = layout_nbytes(out_f, in_f, False, spec, torch.float32 if spec.format == "none" else None)["total"]
        rows.append({
            "shape": f"{out_f}x{in_f}", "case": label, "format": kind.format if kind else "fp32",
            "backend": kind.backend if kind else "torch", "bytes": nbytes, "layout_bytes": lay,
            "bytes_vs_bf16": round(nbytes / (out_f * in_f * 2), 4),
            "relerr": round(((y - ref).norm() / ref.norm()).item(), 5),
            "ms_m1": round(_time_ms(lambda: layer(a1), repeats), 3),
            "ms_m256": round(_time_ms(lambda: layer(a256), max(1, repeats // 2)), 3),
            "quantize_ms": round(q_ms, 1),
        })
        del layer
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--shapes", default="4096x4096,6144x2048", help="comma-separated OUTxIN")
    args = ap.parse_args()
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "cuda": torch.cuda.is_available(), "torch": torch.__version__}
    for _, spec in CASES:  # import backends and build kernels once, outside the timings
        quantize_linear_from_weight(torch.randn(256, 256), None, spec)(torch.randn(1, 256).to(_input_dtype(spec)))
    rows = []
    for s in args.shapes.split(","):
        o, i = (int(v) for v in s.lower().split("x"))
        rows.extend(bench_shape(o, i, args.repeats))
    if args.json:
        print(json.dumps({"machine": machine, "results": rows}, indent=1))
        return
    print(f"machine: {machine}")
    print(f"{'shape':>10} {'case':<13} {'fmt':>5} {'backend':>7} {'bytes':>12} {'=layout':>7} {'vs bf16':>7} "
          f"{'relerr':>8} {'M=1 ms':>8} {'M=256 ms':>9} {'quant ms':>9}")
    for r in rows:
        print(f"{r['shape']:>10} {r['case']:<13} {r['format']:>5} {r['backend']:>7} {r['bytes']:>12,} "
              f"{str(r['bytes'] == r['layout_bytes']):>7} {r['bytes_vs_bf16']:>7.3f} {r['relerr']:>8.4f} "
              f"{r['ms_m1']:>8.2f} {r['ms_m256']:>9.2f} {r['quantize_ms']:>9.1f}")


if __name__ == "__main__":
    main()
