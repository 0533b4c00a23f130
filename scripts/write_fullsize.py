"""Write a complete full-size Ovis-U1-3B checkpoint with random weights (the one every benchmark uses).

Costs, measured on AMD EPYC Zen 5, 2 shared cores (docs/BENCHMARKS.md, "Full-size writer"):
  * disk: 7.29 GB (6.79 GiB) in bf16; 9.71 GB with --generator-fp32;
  * time: 194 s measured (random draws and disk writes);
  * peak RSS of the writer: 0.56 GiB measured (tensors are streamed in 64 MB blocks, never a whole shard).
It only writes; nothing is loaded afterwards (scripts/bench_load.py measures loading). The folder
must be new or empty; `.complete` appears in it last, so other jobs can wait for that file.

    flock /tmp/ovis-heavy.lock python scripts/write_fullsize.py /work/fullsize
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

from lite.model.fullsize import write_fullsize


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="new or empty folder to write the checkpoint into")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokenizer (default 0)")
    ap.add_argument("--generator-fp32", action="store_true",
                    help="store the visual generator (Yak + VAE) in fp32, as its sub-config's torch_dtype hints "
                         "(exercises the loader's cast; 9.71 GB instead of 7.29 GB)")
    args = ap.parse_args()
    start = time.perf_counter()
    try:
        path = write_fullsize(args.out, seed=args.seed, generator_fp32=args.generator_fp32,
                              progress=lambda msg: print(f"[{time.perf_counter() - start:5.0f} s] {msg}",
                                                         file=sys.stderr))
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    print(f"wrote {path} in {time.perf_counter() - start:.0f} s; writer peak RSS {peak:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
