"""Batches, seeds, negative prompts, prompt files, metadata reruns and previews through `main([...])`.

The condition ids are captured where the model receives them (`OvisU1.merge_multimodal`) and compared
with the spec's formula (§4: the Qwen3 user turn, chunks split on `<image>`, joined by [-301, -300, -302]).
"""

from __future__ import annotations

import io
import json
import sys

import pytest
from PIL import Image

from lite.cli.main import main
from tests.spec_formulas import condition_text, spec_ids

T2I_PREFIX = ("Describe the image by detailing the color, shape, size, texture, quantity, text, and spatial "
              "relationships of the objects:")


@pytest.fixture
def tok(tiny_dir):
    from transformers import Qwen2Tokenizer  # the checkpoint's tokenizer class, not ours

    return Qwen2Tokenizer.from_pretrained(str(tiny_dir))


@pytest.fixture
def captured(monkeypatch):
    from lite.model.modeling_ovis_u1 import OvisU1

    seen: list[list[int]] = []
    original = OvisU1.merge_multimodal

    def spy(self, input_ids, visual):
        seen.append([int(v) for v in input_ids.reshape(-1).tolist()])
        return original(self, input_ids, visual)

    monkeypatch.setattr(OvisU1, "merge_multimodal", spy)
    return seen


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def fast(tiny_dir):
    return ["--model", str(tiny_dir), "--device", "cpu", "--dtype", "fp32", "--preset", "reference", "--quiet",
            "--steps", "1", "--width", "32", "--height", "32"]


def test_num_images_seeds_and_negative_prompt_reach_the_unconditional_branch(capsys, tmp_path, fast, tok,
                                                                             captured):
    out = tmp_path / "fox.png"
    code, stdout, err = run(capsys, "generate", "a red fox", "-o", str(out), "--num-images", "3", "--seed", "11",
                            "--negative-prompt", "blurry, dark", "--json", *fast)
    assert code == 0, err
    names = ["fox.png", "fox-1.png", "fox-2.png"]
    results = [json.loads(line) for line in stdout.strip().splitlines()]
    assert [r["seed"] for r in results] == [11, 12, 13] and all(r["preset"] == "reference" for r in results)
    for name, seed in zip(names, (11, 12, 13)):
        text = Image.open(tmp_path / name).text
        assert text["seed"] == str(seed) and json.loads(text["ovis-lite"])["seed"] == seed
        assert json.loads(text["ovis-lite"])["negative_prompt"] == "blurry, dark"
    negative = spec_ids(tok, condition_text("blurry, dark"))
    reference_unconditional = spec_ids(tok, condition_text("Generate an image."))
    cond = spec_ids(tok, condition_text(T2I_PREFIX + "a red fox"))
    assert negative in captured and cond in captured
    assert reference_unconditional not in captured


def test_edit_negative_prompt_replaces_the_no_txt_text(capsys, tmp_path, fast, tok, captured):
    src = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(src)
    argv = [a for a in fast if a not in ("--width", "--height", "32")]
    code, _, err = run(capsys, "edit", str(src), "add a hat", "-o", str(tmp_path / "e.png"),
                       "--negative-prompt", "ugly", *argv)
    assert code == 0, err
    assert spec_ids(tok, condition_text("ugly")) in captured
    assert spec_ids(tok, condition_text("Generate an image.")) not in captured


def test_prompt_file_from_stdin_random_seed_and_pattern(capsys, tmp_path, fast, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a red fox\n\n  a blue bird  \n")))
    code, stdout, err = run(capsys, "generate", "--prompt-file", "-", "-o", str(tmp_path / "b-%02d.png"),
                            "--seed", "random", "--json", *fast)
    assert code == 0, err
    results = [json.loads(line) for line in stdout.strip().splitlines()]
    assert [r["output"] for r in results] == [str(tmp_path / "b-00.png"), str(tmp_path / "b-01.png")]
    assert results[0]["seed"] != results[1]["seed"]  # `random`: each prompt draws its own seed
    metas = [json.loads(Image.open(r["output"]).text["ovis-lite"]) for r in results]
    assert [m["prompt"] for m in metas] == ["a red fox", "a blue bird"]
    assert [m["seed"] for m in metas] == [r["seed"] for r in results]


def test_config_from_metadata_reruns_and_explicit_options_win(capsys, tmp_path, tiny_dir):
    base = ["--model", str(tiny_dir), "--device", "cpu", "--dtype", "fp32", "--quiet"]
    first = tmp_path / "first.png"
    code, _, err = run(capsys, "generate", "a lighthouse", "-o", str(first), "--seed", "5", "--txt-cfg", "3.5",
                       "--steps", "2", "--width", "48", "--height", "32", "--preset", "reference", "--spacing", "karras",
                       "--negative-prompt", "fog", *base)
    assert code == 0, err
    again = tmp_path / "again.png"
    code, _, err = run(capsys, "generate", "--config-from-metadata", str(first), "-o", str(again), "--steps", "1",
                       *base)
    assert code == 0, err
    meta = json.loads(Image.open(again).text["ovis-lite"])
    assert (meta["prompt"], meta["seed"], meta["txt_cfg"], meta["steps"]) == ("a lighthouse", 5, 3.5, 1)
    assert (meta["spacing"], meta["preset"], meta["negative_prompt"]) == ("karras", "reference", "fog")
    assert Image.open(again).size == (48, 32)


def test_preview_is_written_while_denoising(capsys, tmp_path, fast):
    preview = tmp_path / "preview.png"
    argv = [a for a in fast if a not in ("--steps", "1")]
    code, _, err = run(capsys, "generate", "a cat", "-o", str(tmp_path / "p.png"), "--steps", "3",
                       "--preview", str(preview), "--preview-every", "2", *argv)
    assert code == 0, err
    with Image.open(preview) as img:
        assert img.mode == "RGB" and img.size[0] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_outputs_are_checked_before_loading(capsys, tmp_path, fast):
    (tmp_path / "x-1.png").write_bytes(b"mine")
    code, _, err = run(capsys, "generate", "a cat", "-o", str(tmp_path / "x.png"), "-b", "2", *fast)
    assert code == 2 and "x-1.png" in err and "--overwrite" in err
    assert (tmp_path / "x-1.png").read_bytes() == b"mine" and not (tmp_path / "x.png").exists()


def test_api_and_cli_give_the_same_nfe_for_a_preset(capsys, tmp_path, tiny_dir, monkeypatch):
    """One load, used by both: the API call and the CLI (whose from_pretrained returns that pipeline)."""
    from lite import OvisPipeline
    from lite.runtime.presets import PRESETS

    pipe = OvisPipeline.from_pretrained(tiny_dir, device="cpu", preset="low", progress=False)
    api_nfe = pipe.generate("a cat", width=32, height=32).stats.nfe
    loads = []

    def loaded(run):
        loads.append(run.preset.name)
        return pipe

    monkeypatch.setattr(OvisPipeline, "load", loaded)
    code, stdout, err = run(capsys, "generate", "a cat", "-o", str(tmp_path / "l.png"), "--model", str(tiny_dir),
                            "--device", "cpu", "--preset", "low", "--width", "32", "--height", "32", "--quiet",
                            "--json")
    assert code == 0, err
    assert loads == ["low"]
    assert json.loads(stdout)["nfe"] == api_nfe == PRESETS["low"].nfe("t2i", tokens=(32 // 16) ** 2)
