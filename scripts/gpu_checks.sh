#!/usr/bin/env bash
# One prepared GPU session: full-size random checkpoint, then 1024x1024 t2i/edit per preset on emulated
# 8/4/2 GB cards (torch.cuda.set_per_process_memory_fraction). Results land in $OUT (or ./gpu-results).
# Wheels missing on the GPU machine (diffusers, optimum-quanto, bitsandbytes) are taken from .whl/ if present.
set -u
. scripts/gpu_env.sh
STEPS=${STEPS:-4}
CKPT=${CKPT:-/tmp/ovis-full}
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(), torch.cuda.mem_get_info())" | tee "$OUT/env.txt"
if [ ! -f "$CKPT/model.safetensors.index.json" ]; then
  mkdir -p "$CKPT"
  python3 - "$CKPT" <<'PY' 2>&1 | tee "$OUT/ckpt.txt"
import sys, time, torch
from pathlib import Path
torch.set_num_threads(16)
sys.argv = sys.argv[:2]
out = Path(sys.argv[1])
t = time.time()
sys.path.insert(0, "scripts")
from bench_load import write_full_checkpoint
write_full_checkpoint(out, generator_fp32=False)
from lite.tiny import write_tokenizer
write_tokenizer(out)
print(f"checkpoint written in {time.time() - t:.0f} s")
PY
fi
TOTAL_MIB=$(python3 -c "import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**20)")
run() {  # preset, GiB card (0 = whole GPU), tasks...
  local preset=$1 gib=$2; shift 2
  local frac=""
  if [ "$gib" != "0" ]; then frac="--vram-fraction $(python3 -c "print($gib * 1024 / $TOTAL_MIB)")"; fi
  timeout 150 python3 scripts/bench_e2e.py --model "$CKPT" --device cuda --preset "$preset" --size 1024 \
    --steps "$STEPS" --tasks "$@" $frac --threads 16 --json > "$OUT/e2e_${preset}_${gib}g.json" 2> "$OUT/e2e_${preset}_${gib}g.err"
  echo "$preset ${gib}GB exit $?"; tail -c 1500 "$OUT/e2e_${preset}_${gib}g.json"; tail -3 "$OUT/e2e_${preset}_${gib}g.err"
}
run reference 0 t2i edit
run minimal 2 t2i edit
run balanced 8 t2i edit
run tiny 4 t2i
