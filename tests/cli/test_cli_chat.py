"""`ovis-lite chat` scripted through a pipe (stdin replaced), in process so the ids can be captured.

The expected ids are built from the spec's formula (§4, the Qwen3 chat format): user turns
`<|im_start|>user\\n{content}<|im_end|>\\n`, earlier answers `<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n
{answer}<|im_end|>\\n`, the prompt ends with `<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`; text is split on
`<image>`, each chunk tokenized without special tokens, chunks joined by [-301, -300, -302].
"""

from __future__ import annotations

import io
import json
import sys

import numpy as np
from PIL import Image

from lite.cli.main import main
from tests.spec_formulas import THINK, spec_ids, user


def test_scripted_chat_follows_the_reference_template(tmp_path, tiny_dir, monkeypatch, capsys):
    from transformers import Qwen2Tokenizer

    from lite.model.modeling_ovis_u1 import OvisU1

    rng = np.random.default_rng(1)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(a)
    Image.fromarray(rng.integers(0, 255, (64, 32, 3), dtype=np.uint8)).save(b)
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    script = (f"/image {a}\nWhat is it?\nWhat colour is it?\n/save {first}\n/clear\n/image {b}\n"
              f"Describe it.\n/save {second}\n/quit\nnever asked\n")
    seen: list[tuple[list[int], int]] = []
    original = OvisU1.merge_multimodal

    def spy(self, input_ids, visual):
        seen.append(([int(v) for v in input_ids.reshape(-1).tolist()], len(visual)))
        return original(self, input_ids, visual)

    monkeypatch.setattr(OvisU1, "merge_multimodal", spy)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(script.encode())))
    code = main(["chat", "--model", str(tiny_dir), "--device", "cpu", "--dtype", "fp32", "--preset", "reference",
                 "--max-new-tokens", "5", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert len(seen) == 3, seen  # three questions; nothing after /quit

    tok = Qwen2Tokenizer.from_pretrained(str(tiny_dir))
    turns = json.loads(first.read_text())["turns"]
    assert [t["question"] for t in turns] == ["What is it?", "What colour is it?"]
    assert turns[0]["images"] == [str(a)] and turns[1]["images"] == []
    answer1 = turns[0]["answer"]
    expected_second = (user("<image>\nWhat is it?") + "<|im_start|>assistant\n" + THINK + answer1 + "<|im_end|>\n"
                       + user("What colour is it?") + "<|im_start|>assistant\n" + THINK)
    ids, n_images = seen[1]
    assert ids == spec_ids(tok, expected_second)
    assert n_images == 1  # the first turn's image stays in the conversation's one image list

    after_clear = json.loads(second.read_text())["turns"]
    assert [t["question"] for t in after_clear] == ["Describe it."] and after_clear[0]["images"] == [str(b)]
    ids, n_images = seen[2]
    assert ids == spec_ids(tok, user("<image>\nDescribe it.") + "<|im_start|>assistant\n" + THINK)
    assert n_images == 1
    for turn in turns + after_clear:
        assert turn["answer"] in out  # answers stream to stdout


def test_ask_json_reports_tokens_and_speed(tmp_path, tiny_dir, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (32, 48), (200, 10, 10)).save(a)
    Image.new("RGB", (48, 32), (10, 10, 200)).save(b)
    code = main(["ask", str(a), "--image", str(b), "Describe each image.", "--max-new-tokens", "6", "--json",
                 "--model", str(tiny_dir), "--device", "cpu", "--dtype", "fp32", "--preset", "reference", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert 0 < result["tokens"] <= 6 and result["tokens_per_second"] > 0 and result["preset"] == "reference"
    assert "nfe" not in result and "width" not in result
