"""Loading a full-size Ovis-U1-3B checkpoint: time and host RAM (anonymous RSS), measured.

Writes full-size *random* weights in the real layout once (they cost the same to load as the real ones),
then loads them in a fresh process per scenario while a thread samples RssAnon every 5 ms.

    python scripts/bench_load.py --dir /tmp/ovis-full --json
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
from safetensors.torch import save_file


def write_full_checkpoint(out: Path, generator_fp32: bool, shard_bytes: int = 2 << 30) -> None:
    """Random bf16 weights (the generator optionally in fp32, as its config hints) in HF shards + index."""
    from importlib import resources

    from lite.model.config import parse_config
    from lite.model.sizes import meta_model
    from lite.model.architecture import OVIS_U1

    config_text = resources.files("lite").joinpath("data/config.json").read_text()
    for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json"):
        (out / name).write_text(resources.files("lite").joinpath(f"data/{name}").read_text())
    model = meta_model(parse_config(json.loads(config_text)))
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    size, index, weight_map = 0, 0, {}

    def flush() -> None:
        nonlocal shard, size, index
        index += 1
        name = f"model-{index:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for key, t in model.state_dict().items():
        if key in OVIS_U1.tied_weights_keys or key.endswith("inv_freq"):
            continue
        dtype = torch.float32 if generator_fp32 and key.startswith("visual_generator.") else torch.bfloat16
        value = torch.empty(t.shape, dtype=dtype).normal_(0, 0.02, generator=gen)
        shard[key] = value
        size += value.numel() * value.element_size()
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/ovis-lite-full", help="where the full-size random checkpoint lives")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(_measure(args.measure, args.dtype)))
        return
    directory = Path(args.dir)
    if not (directory / "model.safetensors.index.json").exists():
        directory.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        write_full_checkpoint(directory, generator_fp32=True)
        print(f"wrote full-size random checkpoint to {directory} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
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
