"""The conditions phase of repeated generations: the first image computes it, the next ones take it from the cache.

    python scripts/bench_condition_cache.py --json [--checkpoint DIR | --tiny] [--size 256] [--steps 1]

Two paths, each reporting the `conditions` phase per image (seconds, from the run's stats):
- the API: three consecutive `pipe.generate(same prompt)` calls with new seeds;
- the CLI: `ovis-lite generate -b 3 --json` (three jobs, one per seed), read from its JSON lines.
Ratios are image 2 and image 3 over image 1 (the target is <= 0.05). The images are also generated once with
`--no-cache` and compared byte for byte.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def api_phases(checkpoint: str, size: int, steps: int, preset: str | None) -> dict[str, Any]:
    from lite import OvisPipeline

    pipe = OvisPipeline.from_pretrained(checkpoint, device="cpu", preset=preset, progress=False)
    seconds, images = [], []
    for seed in (1, 2, 3):
        images.append(np.asarray(pipe.generate("a lighthouse at dusk", width=size, height=size, steps=steps,
                                              seed=seed).image))
        seconds.append(pipe.last_run.phases["conditions"])
    pipe.caches.set_enabled(False)
    uncached = [np.asarray(pipe.generate("a lighthouse at dusk", width=size, height=size, steps=steps, seed=3).image)
                for _ in range(2)]
    # the baseline: whether two uncached runs of this pipeline agree bitwise at all (the cached one can only match
    # an uncached one where they do)
    return {"conditions_s": seconds, "ratios": [s / seconds[0] for s in seconds[1:]],
            "bitwise_same_as_uncached": bool(np.array_equal(images[-1], uncached[0])),
            "uncached_repeat_bitwise": bool(np.array_equal(uncached[0], uncached[1]))}


def cli_phases(checkpoint: str, size: int, steps: int, preset: str | None, out: Path) -> dict[str, Any]:
    from lite.cli.main import main

    def run(name: str, *extra: str) -> list[dict[str, Any]]:
        buf = io.StringIO()
        argv = ["generate", "a lighthouse at dusk", "-o", str(out / f"{name}.png"), "-b", "3", "--seed", "1",
                "--model", checkpoint, "--device", "cpu", "--width", str(size), "--height", str(size),
                "--steps", str(steps), "--json", "--quiet", *(["--preset", preset] if preset else []), *extra]
        with contextlib.redirect_stdout(buf):
            assert main(argv) == 0
        return [json.loads(line) for line in buf.getvalue().splitlines() if line.startswith("{")]

    cached, plain = run("cached"), run("plain", "--no-cache")
    seconds = [r["phases"]["conditions"] for r in cached]
    same = all(Path(a["output"]).read_bytes() == Path(b["output"]).read_bytes() for a, b in zip(cached, plain))
    return {"conditions_s": seconds, "ratios": [s / seconds[0] for s in seconds[1:]],
            "hits": [r["cache"]["conditions"]["hits"] for r in cached], "bitwise_same_as_no_cache": same}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/work/fullsize")
    ap.add_argument("--tiny", action="store_true", help="a seeded tiny checkpoint instead")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--paths", nargs="+", choices=("api", "cli"), default=["api", "cli"],
                    help="which paths to run (default both; one at a time keeps a full-size run short)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint
        if args.tiny:
            from lite.model.tiny import make_tiny

            ckpt = str(make_tiny(Path(tmp) / "tiny", dtype=torch.bfloat16))
        result: dict[str, Any] = {"checkpoint": "tiny" if args.tiny else ckpt, "preset": args.preset,
                                  "size": args.size, "steps": args.steps}
        if "api" in args.paths:
            result["api"] = api_phases(ckpt, args.size, args.steps, args.preset)
        if "cli" in args.paths:
            result["cli_b3"] = cli_phases(ckpt, args.size, args.steps, args.preset, Path(tmp))
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
