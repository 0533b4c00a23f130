#!/usr/bin/env bash
# Second prepared GPU run: per-format speed (bench_formats) and the offloader side by side with
# diffusers' group offloading and accelerate (bench_offload_compare), on CUDA. Results in $OUT.
set -u
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 110 python3 scripts/bench_formats.py --device cuda --json > "$OUT/formats.json" 2> "$OUT/formats.err"
echo "formats exit $?"; cat "$OUT/formats.json"; tail -3 "$OUT/formats.err"
timeout 150 python3 scripts/bench_offload_compare.py --device cuda --repeats 3 --json > "$OUT/compare.json" 2> "$OUT/compare.err"
echo "compare exit $?"; tail -c 3000 "$OUT/compare.json"; tail -3 "$OUT/compare.err"
