"""Start-up cost of the CLI, as ratios to `python -c "import torch"` measured side by side (interleaved).

    flock /tmp/ovis-heavy.lock python scripts/bench_startup.py [--rounds 5] [--json]

Each round runs every command once, in turn, in fresh processes; the median wall time of each is divided
by the median of `import torch` from the same rounds, so machine load cancels out (mostly: on a shared
machine, run it under the heavy lock). Targets (issue 26, item 7): `presets`, `plan`, `info` and `inspect`
at most 1.5x `import torch`; `ask` on a tiny checkpoint (written once, before the rounds) at most 3x.
The JSON also records the CPU, the load average before and after, and whether Python caches bytecode
(PYTHONDONTWRITEBYTECODE=1 makes every process compile ovis-lite's sources again: ~0.06-0.09 s of CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cpuname, also when imported by a test
from cpuname import cpu_name  # noqa: E402

TARGETS = {"ovis-lite presets": 1.5, "ovis-lite plan": 1.5, "ovis-lite info": 1.5, "ovis-lite inspect": 1.5,
           "ovis-lite ask (tiny)": 3.0}


def tagged_png(path: Path) -> Path:
    """A small PNG with an ovis-lite metadata chunk, for `info` to read."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("ovis-lite", json.dumps({"task": "t2i", "prompt": "a fox", "seed": 7, "steps": 8}))
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def commands(tiny: Path, image: Path) -> dict[str, list[str]]:
    lite = [sys.executable, "-m", "lite"]
    return {
        "import torch": [sys.executable, "-c", "import torch"],
        "ovis-lite --help": [*lite, "--help"],
        "ovis-lite presets": [*lite, "presets"],
        "ovis-lite plan": [*lite, "plan", "--task", "t2i", "--ram", "8GB"],
        "ovis-lite info": [*lite, "info", str(image)],
        "ovis-lite inspect": [*lite, "inspect"],
        "ovis-lite ask (tiny)": [*lite, "ask", "What is it?", "--model", str(tiny), "--device", "cpu",
                                 "--max-new-tokens", "4", "--quiet"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                    help="also time every ovis-lite command from this other checkout (e.g. `git archive` of an older "
                         "commit), in the same rounds: its rows end in ' [baseline]'")
    args = ap.parse_args()
    from lite.model.tiny import make_tiny

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work:
        tiny = make_tiny(Path(work) / "tiny")
        cmds = commands(tiny, tagged_png(Path(work) / "tagged.png"))
        where: dict[str, tuple[dict[str, str] | None, str | None]] = dict.fromkeys(cmds, (None, None))
        if args.baseline is not None:  # `-m lite` finds the package in the working directory first
            checkout = str(args.baseline.resolve())
            for name, cmd in list(cmds.items()):
                if name.startswith("ovis-lite"):
                    cmds[f"{name} [baseline]"] = cmd
                    where[f"{name} [baseline]"] = (dict(os.environ, PYTHONPATH=checkout), checkout)
        times: dict[str, list[float]] = {k: [] for k in cmds}
        for _ in range(args.rounds):
            for name, cmd in cmds.items():
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=where[name][0], cwd=where[name][1])
                times[name].append(time.perf_counter() - t0)
                if proc.returncode != 0:
                    raise SystemExit(f"{name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["import torch"]
    ratio = {k: round(v / base, 2) for k, v in med.items()}
    result = {"seconds": {k: round(v, 2) for k, v in med.items()}, "ratio_to_import_torch": ratio,
              "targets": {k: {"max_ratio": t, "met": ratio[k] <= t} for k, t in TARGETS.items()},
              "rounds": args.rounds, "cpu": cpu_name(), "load_average_before": round(load_before, 2),
              "load_average_after": round(os.getloadavg()[0], 2),
              "bytecode_cache": not sys.flags.dont_write_bytecode}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k in med:
            target = f"  (target <= {TARGETS[k]}x: {'met' if ratio[k] <= TARGETS[k] else 'NOT met'})" \
                if k in TARGETS else ""
            print(f"{k:<34} {med[k]:6.2f} s  {ratio[k]:5.2f}x import torch{target}")


if __name__ == "__main__":
    main()
