"""`ovis-lite demo`: all three tasks on a cached tiny random checkpoint, timed.

The tiny model has random weights, so its answers are gibberish and its images are noise: the
demo shows that the runtime works on this machine, not the model's quality.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from lite.errors import OutputError
from lite.memory import format_bytes, peak_rss_bytes
from lite.model.tiny import make_tiny
from lite.runtime.outputs import check_output_path, save_image

DEMO_SEED = 0
DEMO_SAMPLING = dict(steps=12, solver="unipc", spacing="linear")  # the fast settings


def demo_checkpoint() -> Path:
    """A tiny checkpoint cached under $XDG_CACHE_HOME/ovis-lite (made once)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ovis-lite" / f"tiny-seed{DEMO_SEED}"
    if not (cache / "model.safetensors.index.json").exists():
        make_tiny(cache, seed=DEMO_SEED, overwrite=True)
    return cache


DEMO_FILES = ("t2i.png", "edit.png")


def check_demo_output(out_dir: Path, overwrite: bool) -> None:
    """Refuse before any work when an earlier demo's images (or the user's files) would be replaced."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out {out_dir} is a file, not a folder; choose another --out")
    taken = [name for name in DEMO_FILES if (out_dir / name).exists() or (out_dir / name).is_symlink()]
    if taken and not overwrite:
        raise OutputError(f"{out_dir / taken[0]} already exists; pass --overwrite to replace the demo images, "
                          f"or choose another --out folder")
    for name in DEMO_FILES:
        check_output_path(out_dir / name, overwrite)


def run_demo(out_dir: Path, quiet: bool = False, overwrite: bool = False) -> list[tuple[str, float, int]]:
    check_demo_output(out_dir, overwrite)
    # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
    from lite.runtime.pipeline import OvisPipeline

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    print("ovis-lite demo: a TINY model with RANDOM weights. Its answers are gibberish and its images are "
          "noise; it shows the runtime (loading, all three tasks, timing, memory), not the model's quality.")
    t0 = time.perf_counter()
    ckpt = demo_checkpoint()
    pipe = OvisPipeline.from_pretrained(ckpt, device="cpu", dtype=torch.float32,
                                        progress=not quiet and sys.stderr.isatty())
    say(f"checkpoint {ckpt} ready in {time.perf_counter() - t0:.1f} s")
    rows: list[tuple[str, float, int]] = []

    t = time.perf_counter()
    answer = pipe.understand(Image.new("RGB", (96, 64), (200, 30, 30)), "What is it?", max_new_tokens=16)
    rows.append(("understand", time.perf_counter() - t, peak_rss_bytes()))
    say(f"answer (random weights): {answer.text!r}")

    t = time.perf_counter()
    generated = pipe.generate("a red fox in the snow", width=256, height=256, seed=42, **DEMO_SAMPLING)
    rows.append((f"t2i 256x256, {generated.stats.counts()}", time.perf_counter() - t, peak_rss_bytes()))
    gen_path = save_image(generated.image, out_dir / "t2i.png", overwrite=overwrite,
                          metadata={**generated.metadata(), "model": "tiny random (demo)"})

    t = time.perf_counter()
    edited = pipe.edit(generated.image, "add a hat", seed=42, **DEMO_SAMPLING)
    rows.append((f"edit 256x256, {edited.stats.counts()}", time.perf_counter() - t, peak_rss_bytes()))
    edit_path = save_image(edited.image, out_dir / "edit.png", overwrite=overwrite,
                           metadata={**edited.metadata(), "model": "tiny random (demo)"})

    print(f"{'task':<44} {'seconds':>8} {'peak RAM':>12}")
    for task, secs, peak in rows:
        print(f"{task:<44} {secs:>8.2f} {format_bytes(peak):>12}")
    print(f"images: {gen_path}, {edit_path}  (total {time.perf_counter() - t0:.1f} s)")
    return rows
