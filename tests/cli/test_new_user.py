"""What a new user hits first (issue 26): each friction shown by the real CLI in a subprocess, as typed.

Checked against what the user asked for (the options given, the files written, the README), never
against the code's own output.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.reliability_support import run_cli

README = Path(__file__).resolve().parents[2] / "README.md"
NO_GPU = not torch.cuda.is_available() and not torch.backends.mps.is_available()
only_without_gpu = pytest.mark.skipif(not NO_GPU, reason="what a machine without a GPU plans")


def _png_text(path: Path) -> dict[str, str]:
    with Image.open(path) as img:
        return dict(img.text)


# ---- 6: presets -------------------------------------------------------------------------------------------

def test_presets_prints_the_readmes_rows_in_100_columns():
    plain = run_cli("presets", "--device", "cuda")
    assert plain.rc == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert all(len(line) <= 100 for line in lines), max(lines, key=len)
    readme_rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|[^|]+\|([^|]+)\| ([\d.]+ GiB) \| ([\d.]+ GiB) \| ([\d.]+ GiB) \|$",
                             README.read_text(), re.M)
    assert len(readme_rows) == len(lines) - 1
    for (name, audience, sampler, *peaks), line in zip(readme_rows, lines[1:]):
        assert line.split()[0] == name and audience.strip() in line and sampler.strip() in line, line
        assert all(peak in line for peak in peaks), (peaks, line)
    here = run_cli("presets")  # this machine: a row planned for another device than the README's says so
    assert here.rc == 0 and all(len(line) <= 100 for line in here.stdout.splitlines()), here.stdout
    if NO_GPU:
        assert "note: reference is planned for cpu here; the README's row is for cuda" in here.stdout


# ---- 8: make-tiny -----------------------------------------------------------------------------------------

def test_make_tiny_refuses_a_non_empty_folder_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "mine.txt").write_text("keep me")
    run_cli("make-tiny", tmp_path).assert_one_line_error(str(tmp_path), "not empty", "--overwrite")
    assert (tmp_path / "mine.txt").read_text() == "keep me" and len(list(tmp_path.iterdir())) == 1

    import lite.model.tiny
    from lite.cli.main import main

    def no_work(*args, **kwargs):
        raise AssertionError("make_tiny ran before the folder was checked")

    monkeypatch.setattr(lite.model.tiny, "make_tiny", no_work)
    assert main(["make-tiny", str(tmp_path)]) == 2


# ---- 9: ask with the question first -----------------------------------------------------------------------

def test_ask_with_the_question_first_suggests_the_right_order(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "cat.png")
    line = run_cli("ask", "What is it?", "cat.png", cwd=tmp_path).assert_one_line_error()
    assert line.endswith("e.g. ovis-lite ask cat.png 'What is it?'"), line


# ---- 10: a temperature samples ----------------------------------------------------------------------------

def test_a_temperature_samples_as_the_api_does_and_a_contradiction_is_refused(tiny_dir, tmp_path):
    run_cli("ask", "--sample", "--temperature", "0", "hi").assert_one_line_error("--sample", "--temperature 0")
    common = ["--model", tiny_dir, "--device", "cpu", "--max-new-tokens", "6", "--json", "-s", "5", "Hi?"]
    implied = run_cli("ask", "--temperature", "1.0", *common)
    assert implied.rc == 0, implied.stderr
    result = json.loads(implied.stdout)
    assert result["seed"] == 5  # the seed of a sampled answer is reported; a greedy one has none


# ---- 11, 16: sd.cpp / A1111 conventions, floored sizes ------------------------------------------------------

def test_prefix_matching_is_off_and_the_short_options_parse():
    from lite.cli.parser import build_parser

    argv = ["generate", "--prompt", "a fox", "-W", "512", "-H", "256", "-s", "-1", "--cfg-scale", "3.5"]
    args = build_parser(argv).parse_args(argv)
    assert (args.prompt_option, args.prompt_file, args.width, args.height) == ("a fox", None, 512, 256)
    assert (args.seed, args.txt_cfg) == ("random", 3.5)
    run_cli("generate", "--prompt-fil", "x.txt", "a fox").lines[0].endswith("unrecognized arguments: --prompt-fil x.txt (see --help)")


def test_generate_without_o_names_a_free_output_and_writes_a1111_parameters(tiny_dir, tmp_path):
    (tmp_path / "output.png").write_bytes(b"the user's own file")
    run = run_cli("generate", "-p", "a red fox", "-W", "70", "-H", "50", "-s", "7", "--cfg-scale", "3.5",
                  "--steps", "1", "--model", tiny_dir, "--device", "cpu", cwd=tmp_path)
    assert run.rc == 0, run.stderr
    assert "64x48" in run.lines[0] and "70x50" in run.lines[0], run.lines  # the floored size, from the first line
    assert all("70x50" not in line for line in run.lines[1:]), run.lines
    assert (tmp_path / "output.png").read_bytes() == b"the user's own file"
    out = tmp_path / "output-1.png"
    assert "output-1.png" in run.stderr and Image.open(out).size == (64, 48)
    parameters = _png_text(out)["parameters"].splitlines()
    assert parameters[0] == "a red fox"
    fields = dict(pair.split(": ", 1) for pair in parameters[-1].split(", "))
    assert fields["Steps"] == "1" and fields["Seed"] == "7" and fields["CFG scale"] == "3.5"
    assert fields["Size"] == "64x48" and fields["Model"] == tiny_dir.name


# ---- 12: prompt files --------------------------------------------------------------------------------------

def test_prompt_file_skips_comments_and_each_prompt_draws_its_own_seed(tiny_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text("# my fox series\n\na red fox\n  # not this either\na blue bird\n")
    run = run_cli("generate", "--prompt-file", "prompts.txt", "-o", "out-%d.png", "--seed", "random",
                  "-W", "32", "-H", "32", "--steps", "1", "--model", tiny_dir, "--device", "cpu", "--json",
                  cwd=tmp_path)
    assert run.rc == 0, run.stderr
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert sorted(p.name for p in tmp_path.glob("out-*.png")) == ["out-0.png", "out-1.png"]
    metas = [json.loads(_png_text(tmp_path / f"out-{i}.png")["ovis-lite"]) for i in range(2)]
    assert [m["prompt"] for m in metas] == ["a red fox", "a blue bird"]
    assert [m["seed"] for m in metas] == [r["seed"] for r in results]
    assert metas[0]["seed"] != metas[1]["seed"]


# ---- 13: plan agrees with runs (in-process: `main` is the CLI; these load nothing) ---------------------------

def _plan(capsys, *argv: str) -> tuple[int, str, str]:
    from lite.cli.main import main

    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@only_without_gpu
def test_plan_on_a_cpu_plans_what_a_run_picks_and_never_cuda_untold(capsys):
    code, out, err = _plan(capsys, "--task", "t2i", "--json")
    assert code == 0 and (json.loads(out)["device"], json.loads(out)["preset"]) == ("cpu", "cpu"), err
    code, out, err = _plan(capsys, "--task", "edit", "--budget", "3GB")
    assert code == 2 and err.count("\n") == 1 and "--device cuda" in err and not out
    code, out, err = _plan(capsys, "--task", "edit", "--budget", "3GB", "--device", "cuda", "--json")
    assert code == 0 and json.loads(out)["device"] == "cuda", err
    code, out, err = _plan(capsys, "--task", "t2i", "--ram", "8GB")
    assert code == 0 and "8.0 GiB RAM" in out, err


def test_plan_for_understanding_shows_no_image_phases(capsys):
    code, out, err = _plan(capsys, "--preset", "cpu", "--task", "understand")
    assert code == 0, err
    assert "denoise" not in out and "decode" not in out and "1024x1024" not in out
    assert out.startswith("understand with cpu on cpu")


def test_plan_says_the_floored_size(capsys):
    code, out, err = _plan(capsys, "--preset", "cpu", "--width", "250", "--height", "250")
    assert code == 0 and "t2i 240x240 with cpu" in out and "250x250 is floored" in out, err


# ---- 14: quantize and a pre-quantized checkpoint --------------------------------------------------------------

def test_quantize_says_what_it_wrote_and_loading_says_what_it_was_made_for(tiny_dir, tmp_path):
    out = tmp_path / "tiny-cpu"
    made = run_cli("quantize", "--model", tiny_dir, "--preset", "cpu", "--device", "cpu", "--out", out, "--quiet")
    assert made.rc == 0, made.stderr
    assert "for preset cpu on cpu" in made.stdout and "(cpu: cpu)" not in made.stdout, made.stdout
    asked = run_cli("ask", "--model", out, "--device", "cpu", "--max-new-tokens", "2", "Hi?")
    assert asked.rc == 0, asked.stderr
    assert "tiny-cpu holds weights pre-quantized for preset cpu on cpu" in asked.stderr, asked.stderr
