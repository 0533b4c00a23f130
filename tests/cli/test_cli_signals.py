"""Signals and closed pipes in real processes: one line, the right exit code, nothing left behind.

The runs start together (the machine has few cores; each waits mostly on imports), and each is
signalled only once it is really working: after the load report, and for `ask` after the first
streamed bytes of the answer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

if sys.platform == "win32":
    pytest.skip("POSIX signals", allow_module_level=True)


def _start(argv: list[str], cwd: Path, stdout: int | None = subprocess.PIPE) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "lite", *argv], cwd=cwd, stdout=stdout, stderr=subprocess.PIPE,
                            env=env)


def _signal_when_working(proc: subprocess.Popen, sig: int, streams: bool, result: dict) -> None:
    err = b""
    while b"ovis-lite: loaded" not in err:
        line = proc.stderr.readline()
        if not line:
            break
        err += line
    if streams:
        proc.stdout.read(1)  # the answer has started
    time.sleep(0.5)
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=180)
    result.update(code=proc.returncode, err=(err + rest).decode(errors="replace"))


def _closed_pipe(proc: subprocess.Popen, result: dict) -> None:
    _, err = proc.communicate(timeout=180)
    result.update(code=proc.returncode, err=err.decode(errors="replace"))


def _head(proc: subprocess.Popen, result: dict) -> None:
    """`ask ... | head -c 10`: the reader closes mid-answer."""
    result["read"] = len(proc.stdout.read(10))
    proc.stdout.close()
    _, err = proc.communicate(timeout=180)
    result.update(code=proc.returncode, err=err.decode(errors="replace"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dir) -> tuple[Path, dict]:
    """Every run of this module, started together; each result holds the exit code and stderr."""
    work = tmp_path_factory.mktemp("signals")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(work / "a.png")
    common = ["--model", str(tiny_dir), "--device", "cpu", "--dtype", "fp32", "--preset", "reference"]
    story = ["ask", "a.png", "Tell me a long story.", "--max-new-tokens", "30000", *common]
    results: dict = {}
    threads = []

    def launch(key, argv, target, *extra, stdout=subprocess.PIPE):
        results[key] = {}
        proc = _start(argv, work, stdout=stdout)
        threads.append(threading.Thread(target=target, args=(proc, *extra, results[key])))
        threads[-1].start()
        return proc

    for sig in (signal.SIGINT, signal.SIGTERM):
        name = "int" if sig == signal.SIGINT else "term"
        launch(("generate", sig), ["generate", "a fox", "-o", f"{name}.png", "--steps", "1000", "--width", "64",
                                   "--height", "64", *common], _signal_when_working, sig, False)
        launch(("ask", sig), story, _signal_when_working, sig, True)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte, as with `| head -1` that has finished
    launch("presets", ["presets", "--device", "cuda"], _closed_pipe, stdout=write)
    os.close(write)
    launch("head", [*story, "--quiet"], _head)
    for t in threads:
        t.join(timeout=400)
    return work, results


@pytest.mark.parametrize("command", ["generate", "ask"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_working_ends_with_one_line(runs, command, sig):
    _, results = runs
    result = results[(command, sig)]
    err = result["err"]
    assert result["code"] == (130 if sig == signal.SIGINT else 143), err
    assert "Traceback" not in err and "terminate called" not in err, err
    assert sum("interrupted" in line for line in err.splitlines()) == 1, err


def test_no_partial_output_or_temp_file_is_left(runs):
    work, _ = runs
    assert sorted(p.name for p in work.iterdir()) == ["a.png"]


@pytest.mark.parametrize("key", ["presets", "head"])
def test_a_closed_pipe_ends_quietly(runs, key):
    result = runs[1][key]
    err = result["err"]
    assert result["code"] == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    assert "terminate called" not in err
    if key == "head":
        assert result["read"] == 10


def test_a_signal_that_lands_inside_an_import_still_ends_as_an_interruption(monkeypatch, capsys):
    """A SIGTERM whose `Terminated` is replaced on its way out (it landed in an import's `except ImportError`:
    "TypeError: expected a message argument", seen in CI during diffusers' import) is still one "interrupted"
    line and exit 143; the same exception without a signal is a bug and keeps its traceback."""
    import importlib

    cli = importlib.import_module("lite.cli.main")  # the module (`lite.cli.main` the attribute is the function)

    def mangled(args):
        try:
            cli._on_sigterm(signal.SIGTERM, None)  # what the handler does: record, then raise Terminated
        except cli.Terminated:
            raise TypeError("expected a message argument") from None

    monkeypatch.setattr(cli, "_run", mangled)
    assert cli.main(["info", "x.png"]) == 143
    assert capsys.readouterr().err.strip().startswith("ovis-lite: interrupted (SIGTERM)")

    def bug(args):
        raise TypeError("a bug")

    monkeypatch.setattr(cli, "_run", bug)
    with pytest.raises(TypeError, match="a bug"):
        cli.main(["info", "x.png"])
