"""Help that documents every default with examples, a lazy start-up, and arguments refused while parsing."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from lite.cli.main import main
from lite.cli.parser import build_parser
from lite.cli.settings import output_names

HEAVY = ("torch", "transformers", "diffusers", "safetensors", "numpy", "PIL")


def _subcommands(argv: list[str] | None = None) -> dict[str, argparse.ArgumentParser]:
    parser = build_parser(argv)
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_imports_nothing_heavy():
    code = ("import sys\nfrom lite.cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print('IMPORTED=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "COMMAND" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "IMPORTED=", proc.stderr


def test_bare_command_prints_the_commands(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    for command in ("ask", "chat", "generate", "edit", "plan", "presets", "examples:"):
        assert command in err


# `serve` is the CLI's serve parser (lite/cli/serve.py); its own help is checked below.
@pytest.mark.parametrize("name", sorted(set(_subcommands()) - {"serve"}))
def test_every_option_shows_its_default_and_there_are_examples(name):
    sub = _subcommands()[name]
    text = sub.format_help()
    assert "examples:" in text and f"ovis-lite {name}" in text.split("examples:")[1], text
    formatter = sub._get_formatter()
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        shown = formatter._expand_help(action) if action.help else ""
        assert "default" in shown, f"{name} {action.option_strings or action.dest}: {shown!r}"


def test_serve_is_listed_and_its_help_works():
    from importlib.util import find_spec

    if find_spec("lite.server") is None:
        pytest.skip("lite.server is not installed")
    assert "serve" in _subcommands()
    proc = subprocess.run([sys.executable, "-m", "lite", "serve", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--port" in proc.stdout, proc.stderr


def test_preset_help_lists_the_names():
    from lite.runtime.presets import PRESETS

    text = " ".join(_subcommands()["generate"].format_help().split())
    assert ", ".join(PRESETS) in text


@pytest.mark.parametrize("argv, needle", [
    (["generate", "cat", "-o", "x.png", "--seed", str(2**70)], "out of range"),
    (["generate", "cat", "-o", "x.png", "--seed", "-2"], "out of range"),  # -1 is sd.cpp's `random`
    (["generate", "cat", "-o", "x.png", "--txt-cfg", "inf"], "not a finite number"),
    (["ask", "cat", "--temperature", "nan"], "not a finite number"),
    (["ask", "cat", "--top-p", "1.5"], "--top-p"),
    (["ask", "cat", "--device", "cpu:abc"], "unknown device 'cpu:abc'"),
    (["plan", "--budget", "200000000"], "has no unit"),
    (["plan", "--budget", "4 parsecs"], "cannot read"),
    (["generate", "\udcff\udcfe", "-o", "x.png"], "not valid UTF-8"),
    (["generate", "cat", "-o", "x.png", "-b", "0"], "--num-images"),
])
def test_bad_values_are_refused_while_parsing(capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and needle in err and "Traceback" not in err, err


def test_ask_refuses_a_missing_question(capsys, tmp_path):
    from PIL import Image

    for name in ("a.png", "b.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    for argv in (["ask", str(tmp_path / "a.png"), str(tmp_path / "b.jpg")], ["ask", str(tmp_path / "a.png")],
                 ["ask", "--image", str(tmp_path / "a.png"), "photo.webp"], ["ask"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "question is missing" in err, err


def test_max_new_tokens_past_the_context_is_refused_before_loading(capsys, tiny_dir, monkeypatch):
    import lite.runtime.pipeline as pipeline

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(pipeline.OvisPipeline, "load", no_load)
    code = main(["ask", "What is it?", "--max-new-tokens", "100000", "--model", str(tiny_dir), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "past the model's context" in err and err.strip().count("\n") == 0, err


def test_output_names():
    assert [str(p) for p in output_names("out.png", 3)] == ["out.png", "out-1.png", "out-2.png"]
    assert [str(p) for p in output_names("d/img-%03d.png", 2)] == ["d/img-000.png", "d/img-001.png"]
    assert [str(p) for p in output_names("one.png", 1)] == ["one.png"]


def test_ask_imports_no_image_or_quantization_library(tiny_dir):
    """Understanding never runs the VAE and no bitsandbytes/quanto backend: diffusers (which pulls bitsandbytes,
    torch._dynamo and torch._inductor) and the backends' libraries stay unimported (issue 26, item 7)."""
    unwanted = ("diffusers", "bitsandbytes", "optimum.quanto")
    code = ("import sys\nfrom lite.cli.main import main\n"
            f"code = main(['ask', 'What is it?', '--model', {str(tiny_dir)!r}, '--device', 'cpu', "
            "'--max-new-tokens', '2', '--quiet'])\n"
            f"print('IMPORTED=' + ','.join(m for m in {unwanted!r} if m in sys.modules), file=sys.stderr)\n"
            "sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "IMPORTED=", proc.stderr[-2000:]


def test_the_real_process_freezes_what_torch_leaves_and_a_host_program_keeps_its_gc():
    """`ovis-lite` itself (argv from the process) moves torch's import-time objects out of the cyclic GC's reach
    once torch is imported (start-up: each full collection re-scanned them); `main([...])` called from another
    program never touches that program's GC."""
    code = ("import gc, sys\nfrom lite.cli.main import main\nsys.argv = ['ovis-lite', 'presets', '--json']\n"
            "code = main()\nprint('FROZEN', gc.get_freeze_count(), 'torch' in sys.modules, file=sys.stderr)\n"
            "sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    frozen, torch_loaded = proc.stderr.split("FROZEN")[-1].split()
    assert torch_loaded == "True" and int(frozen) > 100_000, proc.stderr[-500:]
    code = ("import gc, sys\nfrom lite.cli.main import main\ncode = main(['presets', '--json'])\n"
            "print('FROZEN', gc.get_freeze_count(), file=sys.stderr)\nsys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr.split("FROZEN")[-1].split() == ["0"], proc.stderr[-500:]
