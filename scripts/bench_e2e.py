"""End to end: load a checkpoint with a preset, then time understand / t2i / edit and read the peaks.

Runs on whatever device is given (cpu, cuda, mps). On CUDA it reports `torch.cuda.max_memory_allocated`;
`--vram-fraction F` emulates a smaller card with `torch.cuda.set_per_process_memory_fraction`.

    python scripts/bench_e2e.py --model DIR --preset cpu --device cpu --size 256 --tasks understand t2i --json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=256, help="square output side for t2i / edit input")
    ap.add_argument("--steps", type=int, help="override the preset's steps")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--tasks", nargs="+", default=["understand", "t2i", "edit"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vram-fraction", type=float, help="CUDA only: emulate a smaller card")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.vram_fraction and args.device.startswith("cuda"):
        torch.cuda.set_per_process_memory_fraction(args.vram_fraction)

    from PIL import Image

    from lite.memory import device_peak_bytes, peak_rss_bytes, reset_device_peak, rss_anon_bytes
    from lite.runtime.pipeline import OvisPipeline
    from lite.runtime.presets import get_preset

    preset = get_preset(args.preset)
    t0 = time.perf_counter()
    pipe = OvisPipeline.from_pretrained(args.model, device=args.device, preset=preset, progress=False)
    result: dict = {"preset": preset.name, "device": args.device, "load_seconds": time.perf_counter() - t0,
                    "rss_anon_after_load": rss_anon_bytes(), "runs": {}}
    steps = args.steps or preset.steps
    sampling = dict(steps=steps, solver=preset.solver, spacing=preset.spacing, cfg_interval=preset.cfg_interval)
    image = Image.new("RGB", (args.size, args.size), (120, 80, 200))
    for task in args.tasks:
        reset_device_peak(pipe.device)
        t = time.perf_counter()
        if task == "understand":
            out = pipe.understand(image, "What is it?", max_new_tokens=args.new_tokens)
        elif task == "t2i":
            out = pipe.generate("a red fox in the snow", width=args.size, height=args.size, **sampling)
        else:
            out = pipe.edit(image, "add a hat", **sampling)
        stats = out.stats
        result["runs"][task] = {"seconds": time.perf_counter() - t, "nfe": stats.nfe, "tokens": stats.tokens,
                                "phases": stats.phases,
                                "peak_device_bytes": device_peak_bytes(pipe.device),
                                "peak_rss_bytes": peak_rss_bytes(),
                                "offload_plan_peak": pipe.offload_plan.planned_peak_bytes if pipe.offload_plan else None}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{preset.name} on {args.device}: load {result['load_seconds']:.1f} s")
        for task, r in result["runs"].items():
            print(f"  {task:<10} {r['seconds']:7.1f} s  NFE {r['nfe']:>3}  peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB"
                  f"  device {r['peak_device_bytes']}")


if __name__ == "__main__":
    main()
