"""The CLI gets the server's input classes (issue 25): a literal `<image>` in a question or a prompt is
text and succeeds; a lone surrogate (argv bytes that are not UTF-8, a prompt file that is not UTF-8)
ends in one clean line and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lite.cli.main import main
from lite.server.launch import REPO

RUN = ["--device", "cpu", "--preset", "cpu", "--quiet"]


def test_ask_with_a_literal_image_tag(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (0, 90, 200)).save(img)
    assert main(["ask", "What does <image> mean?", "--max-new-tokens", "2", "--model", str(tiny_dir), *RUN]) == 0
    assert main(["ask", str(img), "<image><image> twice?", "--max-new-tokens", "2", "--model", str(tiny_dir), *RUN]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_generate_with_a_literal_image_tag(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sign.png"
    code = main(["generate", "a <image> sign", "--negative-prompt", "<image>", "--width", "32", "--height", "32",
                 "--steps", "1", "-o", str(out), "--model", str(tiny_dir), *RUN])
    assert code == 0 and Image.open(out).size == (32, 32)


@pytest.mark.parametrize("where", ["ask", "generate", "prompt-file", "negative"])
def test_invalid_text_is_one_line(tiny_dir: Path, tmp_path: Path, where: str) -> None:
    bad = b"a \xed\xa0\x80 fox"  # a UTF-16 surrogate written as UTF-8 bytes: not UTF-8 text
    out = tmp_path / "x.png"
    gen = ["generate", "--width", "32", "--height", "32", "--steps", "1", "-o", str(out), "--model", str(tiny_dir), *RUN]
    if where == "ask":
        args = ["ask", bad.decode("utf-8", "surrogateescape"), "--model", str(tiny_dir), *RUN]
    elif where == "generate":
        args = [*gen, bad.decode("utf-8", "surrogateescape")]
    elif where == "negative":
        args = [*gen, "a fox", "--negative-prompt", bad.decode("utf-8", "surrogateescape")]
    else:
        prompts = tmp_path / "prompts.txt"
        prompts.write_bytes(b"a cat\n" + bad + b"\n")
        args = [*gen, "--prompt-file", str(prompts)]
    argv = [a.encode("utf-8", "surrogateescape") for a in args]  # the bytes a shell would pass
    r = subprocess.run([sys.executable.encode(), b"-m", b"lite", *argv], cwd=REPO, capture_output=True, timeout=300)
    err = r.stderr.decode("utf-8", "replace").strip().splitlines()
    assert r.returncode == 2, r.stderr.decode("utf-8", "replace")[-2000:]
    assert len(err) == 1 and err[0].startswith("ovis-lite") and "error:" in err[0], err
    assert "Traceback" not in r.stderr.decode("utf-8", "replace")
    assert not out.exists()
