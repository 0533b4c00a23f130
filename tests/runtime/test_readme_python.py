"""The README's Python block runs as written on the tiny model.

Only what the block itself documents is provided: `$OVIS_LITE_MODEL` names the checkpoint and a `cat.png`
lies in the working folder. Nothing of the block is rewritten.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_python_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 1, "the README lost its Python block"
    return blocks[0]


def test_the_readme_python_block_runs_as_written(tiny_dir, tmp_path, monkeypatch):
    from lite.runtime.metadata import read_metadata

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OVIS_LITE_MODEL", str(tiny_dir))
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save("cat.png")
    printed = io.StringIO()
    namespace: dict[str, object] = {"__name__": "readme"}
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_python_block(), "README.md", "exec"), namespace)  # noqa: S102 - the block under test
    fox, foxes, edited = namespace["fox"], namespace["foxes"], namespace["edited"]
    meta = read_metadata(tmp_path / "fox.png")
    assert meta["task"] == "t2i" and meta["prompt"] == "a red fox in the snow" and meta["preset"] == "cpu"
    assert Image.open(tmp_path / "fox.png").size == (256, 256)
    assert foxes.seeds == [7, 8] and len(foxes.images) == 2  # type: ignore[attr-defined]
    # the callback returned False at step 10 of 20: stopped quietly, marked, the one image decoded
    assert edited.cancelled and len(edited.images) == 1  # type: ignore[attr-defined]
    assert edited.stats.nfe_total == 10 * 3  # type: ignore[attr-defined]
    assert not fox.cancelled  # type: ignore[attr-defined]
    lines = printed.getvalue().splitlines()
    assert lines[-2] == "[7, 8] 2"
    assert lines[-1] == f"True 20 steps, NFE {edited.stats.nfe} per image"  # type: ignore[attr-defined]
