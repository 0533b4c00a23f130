"""The CLI: one-line errors with exit code 2, safe outputs, metadata, inspect, make-tiny, demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lite.cli.main import main
from offload.errors import UserError

from tests.conftest import REAL_CONFIG


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "error" in lines[0] and needle in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.fixture
def image_file(tmp_path) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def gen_args(tiny_dir):
    return ["--model", str(tiny_dir), "--device", "cpu", "--dtype", "fp32", "--preset", "reference", "--quiet",
            "--steps", "2"]


def test_generate_writes_png_with_metadata_and_json(capsys, tmp_path, gen_args):
    out = tmp_path / "new" / "sub" / "out.png"
    code, stdout, _ = run(capsys, "generate", "a red fox", "-o", str(out), "--width", "48", "--height", "32",
                          "--seed", "3", "--json", *gen_args)
    assert code == 0 and out.exists()
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["output"] == str(out) and result["nfe"] == 4 and result["seconds"] > 0
    assert result["peak_rss_bytes"] > 0
    assert Image.open(out).size == (48, 32)
    code, stdout, _ = run(capsys, "info", str(out), "--json")
    meta = json.loads(stdout)
    assert meta["prompt"] == "a red fox" and meta["seed"] == 3 and meta["steps"] == 2 and meta["solver"] == "euler"
    assert meta["txt_cfg"] == 5.0 and meta["software"].startswith("ovis-lite ")
    text = Image.open(out).text  # plain tEXt chunks any PNG tool can read
    assert text["prompt"] == "a red fox" and text["seed"] == "3"
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_existing_output_is_never_overwritten(capsys, tmp_path, gen_args):
    out = tmp_path / "out.png"
    out.write_bytes(b"precious")
    code, _, err = run(capsys, "generate", "a cat", "-o", str(out), *gen_args)
    assert_one_line_error(code, err, "--overwrite")
    assert out.read_bytes() == b"precious"
    code, _, _ = run(capsys, "generate", "a cat", "-o", str(out), "--overwrite", "--width", "32", "--height", "32",
                     *gen_args)
    assert code == 0 and out.read_bytes() != b"precious"


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    from lite.runtime.outputs import save_image

    out = tmp_path / "out.png"
    out.write_bytes(b"old")

    def broken_save(self, fp, *a, **k):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises((OSError, UserError)):  # the encoder's failure, reported as one line or raised
        save_image(Image.new("RGB", (4, 4)), out, overwrite=True)
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_edit_and_ask(capsys, tmp_path, image_file, gen_args):
    out = tmp_path / "edited.png"
    code, _, _ = run(capsys, "edit", str(image_file), "add a hat", "-o", str(out), *gen_args)
    assert code == 0 and Image.open(out).size == (64, 64)  # smart_resize(48, 64, factor 32) = 64 x 64
    args = [a for a in gen_args if a not in ("--steps", "2")]
    code, stdout, _ = run(capsys, "ask", str(image_file), "What is it?", "--max-new-tokens", "4", "--json", *args)
    assert code == 0 and "answer" in json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv, needle", [
    (["generate", "", "-o", "x.png"], "prompt is empty"),
    (["generate", "cat", "-o", "x.png", "--steps", "0"], "--steps"),
    (["generate", "cat", "-o", "x.png", "--txt-cfg", "-1"], "--txt-cfg"),
    (["generate", "cat", "-o", "x.png", "--width", "8"], "--width"),
    (["generate", "cat", "-o", "x.png", "--height", "5000"], "--height"),
    (["generate", "cat", "-o", "x.txt"], "must end in"),
    (["edit", "IMG", "", "-o", "x.png"], "instruction is empty"),
    (["edit", "IMG", "hat", "-o", "x.png", "--img-cfg", "-2"], "--img-cfg"),
    (["edit", "missing.png", "hat", "-o", "x.png"], "not found"),
    (["ask", "IMG", "  "], "question is empty"),
    (["generate", "cat", "-o", "x.png", "--steps", "abc"], "invalid int"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_are_one_line_errors(capsys, tmp_path, image_file, argv, needle):
    argv = [a.replace("IMG", str(image_file)) for a in argv]
    argv = [str(tmp_path / a) if a.endswith((".png", ".txt")) and a != str(image_file) else a for a in argv]
    try:
        code, _, err = run(capsys, *argv)
    except SystemExit as exc:  # argparse errors
        code, err = exc.code, capsys.readouterr().err
    assert_one_line_error(code, err, needle)


@pytest.mark.parametrize("kind", ["unreadable", "corrupt", "zero", "huge", "directory"])
def test_bad_images_are_one_line_errors(capsys, tmp_path, kind):
    path = tmp_path / "bad.png"
    if kind == "unreadable":
        Image.new("RGB", (8, 8)).save(path)
        path.chmod(0)
        if os.access(path, os.R_OK):  # root reads anything: use a path that cannot be opened instead
            path = tmp_path / "dir.png" / "x.png"
    elif kind == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    elif kind == "zero":
        path.write_bytes(b"")
    elif kind == "huge":
        Image.new("L", (10000, 4001)).save(path)  # 40.01 MP, refused from the header alone
    else:
        path = tmp_path / "folder.png"
        path.mkdir()
    code, _, err = run(capsys, "edit", str(path), "add a hat", "-o", str(tmp_path / "out.png"))
    assert_one_line_error(code, err, "")


def test_cli_error_in_a_real_process_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lite", "generate", "", "-o", str(tmp_path / "a.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "ovis-lite: error: prompt is empty; give a non-empty prompt"


def test_missing_checkpoint_message(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("OVIS_LITE_MODEL", raising=False)
    code, _, err = run(capsys, "generate", "cat", "-o", str(tmp_path / "a.png"), "--model", str(tmp_path / "none"))
    assert_one_line_error(code, err, "AIDC-AI/Ovis-U1-3B")
    assert "--model" in err


def test_inspect_real_config_json(capsys):
    code, out, _ = run(capsys, "inspect", "--config", str(REAL_CONFIG / "config.json"), "--tensors", "--json")
    result = json.loads(out)
    assert code == 0 and result["total_params"] == 3_644_208_367
    assert result["tensors"] == json.loads((REAL_CONFIG / "tensors.json").read_text())
    assert result["components"]["yak"] == {"params": 1_127_227_408, "bytes": 2 * 1_127_227_408}


def test_inspect_a_checkpoint_directory(capsys, tiny_dir):
    code, out, _ = run(capsys, "inspect", "--model", str(tiny_dir))
    assert code == 0 and "yak" in out and "total" in out


def test_make_tiny_refuses_to_overwrite(capsys, tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    code, _, err = run(capsys, "make-tiny", str(target))
    assert_one_line_error(code, err, "not empty")
    assert (target / "mine.txt").read_text() == "keep"


def test_info_on_a_plain_image(capsys, image_file):
    code, _, err = run(capsys, "info", str(image_file))
    assert_one_line_error(code, err, "no ovis-lite metadata")


def test_demo_runs_all_three_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "lite", "demo", "--quiet"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM weights" in proc.stdout
    for task in ("understand", "t2i", "edit"):
        assert task in proc.stdout
    assert (tmp_path / "ovis-lite-demo" / "t2i.png").exists() and (tmp_path / "ovis-lite-demo" / "edit.png").exists()
    before = (tmp_path / "ovis-lite-demo" / "t2i.png").read_bytes()
    again = subprocess.run([sys.executable, "-m", "lite", "demo", "--quiet"], capture_output=True, text=True,
                           timeout=600)  # refused before any work: the earlier images are kept
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
    assert (tmp_path / "ovis-lite-demo" / "t2i.png").read_bytes() == before


def test_inspect_preset_reports_quantized_bytes(capsys):
    code, out, _ = run(capsys, "inspect", "--config", str(REAL_CONFIG / "config.json"), "--preset", "balanced",
                       "--json")
    result = json.loads(out)
    assert code == 0 and result["total_bytes"] == sum(c["bytes"] for c in result["components"].values())
    assert result["components"]["llm"]["bytes"] <= 1.25e9  # 4-bit LLM target
    assert result["total_bytes"] <= 3.2e9  # the 8 GB policy target


def test_quantize_command_writes_a_checkpoint_that_generates(capsys, tmp_path, tiny_dir):
    out = tmp_path / "q"
    code, stdout, _ = run(capsys, "quantize", "--model", str(tiny_dir), "--preset", "low", "--out", str(out),
                          "--device", "cpu", "--quiet")
    assert code == 0 and "wrote" in stdout
    code, _, err = run(capsys, "quantize", "--model", str(tiny_dir), "--preset", "low", "--out", str(out),
                       "--device", "cpu", "--quiet")
    assert_one_line_error(code, err, "")  # never overwrites
    image = tmp_path / "q.png"
    code, stdout, _ = run(capsys, "generate", "a cat", "-o", str(image), "--model", str(out), "--device", "cpu",
                          "--width", "32", "--height", "32", "--steps", "2", "--quiet", "--json")
    assert code == 0 and json.loads(stdout)["nfe"] > 0 and Image.open(image).size == (32, 32)


def test_generate_with_a_quantizing_preset(capsys, tmp_path, tiny_dir):
    out = tmp_path / "low.png"
    code, stdout, err = run(capsys, "generate", "a cat", "-o", str(out), "--model", str(tiny_dir), "--device", "cpu",
                            "--preset", "low", "--width", "32", "--height", "32", "--json")
    result = json.loads(stdout)
    assert code == 0 and result["nfe"] <= 24, err
    # a preset made for CUDA, run on the CPU, says so in one line (the runtime's warning, as a notice)
    assert [ln for ln in err.splitlines() if "preset low is meant for cuda" in ln][0].startswith("ovis-lite: ")
    assert "UserWarning" not in err
    meta = json.loads(Image.open(out).text["ovis-lite"])
    assert meta["preset"] == "low" and meta["solver"] == "unipc" and meta["steps"] == 12


def test_dtype_override_with_a_quantizing_preset(capsys, tmp_path, tiny_dir):
    """--dtype fp32 must reach the quantized layers too, or attention mixes fp32 and bf16."""
    out = tmp_path / "fp32.png"
    code, stdout, err = run(capsys, "generate", "a cat", "-o", str(out), "--model", str(tiny_dir), "--device", "cpu",
                            "--preset", "cpu", "--dtype", "fp32", "--width", "32", "--height", "32", "--steps", "2",
                            "--quiet", "--json")
    assert code == 0, err
    assert Image.open(out).size == (32, 32)
