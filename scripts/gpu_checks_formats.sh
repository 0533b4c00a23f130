#!/usr/bin/env bash
# Second prepared GPU run: per-format speed (bench_formats) and the offloader side by side with
# diffusers' group offloading and accelerate (bench_offload_compare), on CUDA. Results in $OUT.
set -u
. scripts/gpu_env.sh
timeout 110 python3 scripts/bench_formats.py --device cuda --json > "$OUT/formats.json" 2> "$OUT/formats.err"
echo "formats exit $?"; cat "$OUT/formats.json"; tail -3 "$OUT/formats.err"
timeout 150 python3 scripts/bench_offload_compare.py --device cuda --repeats 3 --json > "$OUT/compare.json" 2> "$OUT/compare.err"
echo "compare exit $?"; tail -c 3000 "$OUT/compare.json"; tail -3 "$OUT/compare.err"
