"""Start-up cost of the CLI, as ratios to `python -c "import torch"` measured side by side (interleaved).

    python scripts/bench_startup.py [--rounds 3] [--json]

Each round runs every command once, in turn, in fresh processes; the median wall time of each is divided
by the median of `import torch` from the same rounds, so machine load cancels out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "ovis-lite --help": [sys.executable, "-m", "lite", "--help"],
    "ovis-lite presets": [sys.executable, "-m", "lite", "presets"],
    "ovis-lite plan": [sys.executable, "-m", "lite", "plan", "--task", "t2i", "--budget", "4GB"],
    "ovis-lite inspect": [sys.executable, "-m", "lite", "inspect"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for _ in range(args.rounds):
        for name, cmd in COMMANDS.items():
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            times[name].append(time.perf_counter() - t0)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["import torch"]
    result = {"seconds": {k: round(v, 2) for k, v in med.items()},
              "ratio_to_import_torch": {k: round(v / base, 2) for k, v in med.items()}}
    if args.json:
        print(json.dumps(result))
    else:
        for k in COMMANDS:
            print(f"{k:<20} {med[k]:6.2f} s  {med[k] / base:5.2f}x import torch")


if __name__ == "__main__":
    main()
