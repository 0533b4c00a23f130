"""Loading a full-size Ovis-U1-3B checkpoint: time and host RAM (anonymous RSS), measured.

Loads the complete full-size random checkpoint (they cost the same to load as the real weights) in a
fresh process per scenario while a thread samples RssAnon every 5 ms. If `--dir` holds none yet, it is
written first by the shared writer (`scripts/write_fullsize.py`: 7.29 GB on disk, 2-4 minutes, writer
peak RSS 0.56 GiB); `--write-only` stops after writing. The load itself peaks at several GB of RAM:
run it under the heavy lock.

    flock /tmp/ovis-heavy.lock python scripts/bench_load.py --dir /work/fullsize --json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from lite.model.fullsize import COMPLETE_MARKER, write_fullsize


def _measure(directory: str, dtype: str) -> dict[str, float]:
    """Runs in a fresh process: load, sampling RssAnon all along."""
    from lite.model.checkpoint import load_model
    from lite.memory import rss_anon_bytes, trim_host_heap

    trim_host_heap()
    base = rss_anon_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon_bytes())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    model, report = load_model(directory, device="cpu", dtype=getattr(torch, dtype), progress=False)
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    trim_host_heap()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    return {"seconds": seconds, "baseline_rss_anon": base, "peak_rss_anon": peak[0],
            "final_rss_anon": rss_anon_bytes(), "model_bytes": model_bytes, "largest_tensor_bytes": largest,
            "stored_dtypes": report.stored_dtypes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--dir", default="/work/fullsize",
                    help="the full-size random checkpoint (written here first if the folder is new or empty)")
    ap.add_argument("--write-only", action="store_true", help="write the checkpoint if missing, load nothing")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(_measure(args.measure, args.dtype)))
        return
    directory = Path(args.dir)
    if not (directory / COMPLETE_MARKER).exists():
        t = time.perf_counter()
        try:
            write_fullsize(directory)
        except FileExistsError as exc:
            sys.exit(f"error: {exc} (and it has no {COMPLETE_MARKER} marker of a finished full-size checkpoint)")
        print(f"wrote full-size random checkpoint to {directory} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    if args.write_only:
        return
    results = {}
    for dtype in ("bfloat16",):
        proc = subprocess.run([sys.executable, __file__, "--measure", str(directory), "--dtype", dtype],
                              capture_output=True, text=True, check=True)
        results[dtype] = json.loads(proc.stdout.strip().splitlines()[-1])
    if args.json:
        print(json.dumps({"machine": "see docs/BENCHMARKS.md", "results": results}, indent=2))
    else:
        for dtype, r in results.items():
            gib = 1 << 30
            print(f"{dtype}: {r['seconds']:.1f} s; model {r['model_bytes'] / gib:.2f} GiB; RssAnon baseline "
                  f"{r['baseline_rss_anon'] / gib:.2f}, peak {r['peak_rss_anon'] / gib:.2f}, final "
                  f"{r['final_rss_anon'] / gib:.2f} GiB; largest tensor {r['largest_tensor_bytes'] / gib:.2f} GiB")


if __name__ == "__main__":
    main()
