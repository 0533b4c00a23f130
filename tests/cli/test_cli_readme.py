"""Every `ovis-lite` command line of the README runs and exits 0.

The commands are read from the README's ```bash blocks, in order, in one folder (so `info fox.png` reads
the image an earlier line wrote). Only what a tiny machine needs is substituted: the tiny checkpoint for
the model, 64 px sides, one step, a few tokens; `plan`, `presets` and `inspect` use the shipped config.
`ovis-lite demo` (in the install line) is run by tests/cli/test_cli.py::test_demo_runs_all_three_tasks.
"""

from __future__ import annotations

import io
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lite.cli.main import main

README = Path(__file__).resolve().parents[2] / "README.md"
TASKS = ("ask", "chat", "generate", "edit")


def readme_commands() -> list[tuple[str, str | None]]:
    """(command line, stdin) for each line of a bash block that runs ovis-lite."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    found = []
    for block in blocks:
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("ovis-lite "):
                found.append((line, None))
            elif re.match(r"printf '[^']*' \| ovis-lite ", line):
                text, command = re.match(r"printf '([^']*)' \| (ovis-lite .*)", line).groups()
                found.append((command, text.encode().decode("unicode_escape")))
    return found


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    if flag in argv:
        argv[argv.index(flag) + 1] = value
        return argv
    return argv + [flag, value]


def substitute(argv: list[str], tiny: Path) -> list[str]:
    """Tiny sizes and the tiny checkpoint; everything else as written."""
    command = argv[0]
    if "--model" in argv:
        argv = _set(argv, "--model", str(tiny))
    if command in TASKS:
        argv = _set(argv, "--model", str(tiny)) + ["--device", "cpu", "--quiet"]
    if command in ("ask", "chat"):
        argv = _set(argv, "--max-new-tokens", "4")
    if command in ("generate", "edit"):
        argv = _set(argv, "--steps", "1")
        if command == "generate" and "--config-from-metadata" not in argv:
            argv = _set(_set(argv, "--width", "64"), "--height", "64")
    if command == "quantize":
        import torch

        if not torch.cuda.is_available():
            argv = _set(argv, "--device", "cpu")
        argv.append("--quiet")
    return argv


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for name, size in (("cat.png", (64, 48)), ("a.png", (48, 64)), ("b.png", (64, 64))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "prompts.txt").write_text("a red fox\n\na blue bird\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_lists_the_commands_it_documents():
    commands = [c for c, _ in readme_commands()]
    for needle in ("ovis-lite ask ", "ovis-lite chat", "ovis-lite generate ", " -b 3", "--negative-prompt",
                   "--prompt-file", "--config-from-metadata", "--preview ", "ovis-lite edit ",
                   "ovis-lite plan --task t2i", "ovis-lite plan --task edit --budget 3GB --device cuda",
                   "ovis-lite plan --task t2i --ram 8GB", "ovis-lite generate -p ",
                   "ovis-lite plan --preset tiny --budget 3GB", "ovis-lite presets", "ovis-lite quantize"):
        assert any(needle in c for c in commands), needle
    assert "huggingface-cli" not in README.read_text() and "hf download AIDC-AI/Ovis-U1-3B" in README.read_text()


def test_every_readme_command_exits_0(workdir, tiny_dir, capsys, monkeypatch):
    from lite.runtime.pipeline import OvisPipeline

    # Each preset's tiny model loads once and serves every line that asks for it (loading is tested
    # elsewhere; here the command lines are): the lines still resolve and hand over the whole run.
    load = OvisPipeline.load
    loaded: dict = {}

    def load_once(run):
        key = (str(run.directory), run.preset.name, str(run.device), str(run.dtype))
        if key not in loaded:
            loaded[key] = load(run)
        return loaded[key]

    monkeypatch.setattr(OvisPipeline, "load", load_once)
    ran = []
    for line, stdin in readme_commands():
        argv = substitute(shlex.split(line)[1:], tiny_dir)
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0, f"{line!r} -> {argv} exited {code}: {err}"
        assert "Traceback" not in err
        ran.append(argv[0])
    assert set(ran) >= {"ask", "chat", "generate", "edit", "info", "inspect", "presets", "plan", "quantize"}
    assert [p.name for p in sorted(workdir.glob("fox-b*.png"))] == ["fox-b-1.png", "fox-b-2.png", "fox-b.png"]
    assert sorted(p.name for p in workdir.glob("batch-*.png")) == ["batch-00.png", "batch-01.png"]
    assert (workdir / "preview.png").exists() and (workdir / "chat.json").exists()
