"""The shared full-size writer: its streamed safetensors, its shard split, its tokenizer, its refusals.

Checked with independent readers (safetensors' own `safe_open`, the `tokenizers` library) on small
shapes, so the test writes kilobytes, not the 7 GB checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lite.model import fullsize
from lite.model.tiny import init_mean_std

SHAPES = {"llm.model.layers.0.mlp.up_proj.weight": (96, 64), "llm.model.norm.weight": (64,),
          "visual_generator.backbone.img_in.bias": (48,)}


def test_streamed_shard_reads_back_with_safetensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fullsize, "BLOCK_BYTES", 1024)  # many blocks per tensor
    dtypes = fullsize.stored_dtypes(SHAPES, generator_fp32=True)
    nbytes = fullsize.write_shard(tmp_path / "a.safetensors", SHAPES, dtypes, seed=3)
    assert nbytes == 96 * 64 * 2 + 64 * 2 + 48 * 4
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(SHAPES)
        for name, shape in SHAPES.items():
            t = f.get_tensor(name)
            assert tuple(t.shape) == shape and t.dtype == dtypes[name]
            mean, std = init_mean_std(name, shape)
            assert abs(t.float().mean().item() - mean) < 4 * std / math.sqrt(t.numel())
            assert 0.8 * std < t.float().std().item() < 1.2 * std


def test_values_depend_on_seed_and_name_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dtypes = fullsize.stored_dtypes(SHAPES, generator_fp32=False)
    name = "llm.model.layers.0.mlp.up_proj.weight"
    fullsize.write_shard(tmp_path / "all.safetensors", SHAPES, dtypes, seed=1)
    fullsize.write_shard(tmp_path / "one.safetensors", {name: SHAPES[name]}, dtypes, seed=1)
    fullsize.write_shard(tmp_path / "other.safetensors", {name: SHAPES[name]}, dtypes, seed=2)
    read = {}
    for label in ("all", "one", "other"):
        with safe_open(str(tmp_path / f"{label}.safetensors"), framework="pt") as f:
            read[label] = f.get_tensor(name)
    assert torch.equal(read["all"], read["one"])
    assert not torch.equal(read["one"], read["other"])


def test_shards_split_before_the_limit_in_order() -> None:
    shapes = {"a": (10,), "b": (10,), "c": (30,), "d": (1,)}
    dtypes = {k: torch.float32 for k in shapes}
    shards = fullsize.plan_shards(shapes, dtypes, shard_bytes=100)
    assert [list(s) for s in shards] == [["a", "b"], ["c"], ["d"]]  # 80 B, 120 B (alone), 4 B


def test_tokenizer_is_a_consistent_byte_level_bpe(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    fullsize.write_full_tokenizer(tmp_path, size=1000)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    merges = (tmp_path / "merges.txt").read_text().splitlines()[1:]
    assert sorted(vocab.values()) == list(range(1000))  # ids dense: the special ids follow the last one
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in (m.split(" ") for m in merges))
    tok = Tokenizer(models.BPE.from_file(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")))
    assert tok.get_vocab_size() == 1000


def test_writer_refuses_a_folder_with_files(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        fullsize.write_fullsize(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_full_shapes_are_the_real_checkpoint_without_the_tied_head() -> None:
    shapes = fullsize.full_tensor_shapes()
    assert "llm.lm_head.weight" not in shapes
    assert shapes["llm.model.embed_tokens.weight"] == (151936, 2048)
    assert sum(math.prod(s) for s in shapes.values()) == 3_644_208_367  # docs/ovis_u1_spec.md §1 total
