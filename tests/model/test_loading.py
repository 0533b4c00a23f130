"""make-tiny, the streaming loader, and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lite.errors import CheckpointError
from lite.model.checkpoint import find_checkpoint, load_model
from lite.model.tiny import make_tiny
from lite.model.tokenizer import load_tokenizer


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _stored(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def test_tiny_layout(tiny_dir):
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and all((tiny_dir / s).exists() for s in shards)
    for name in ("config.json", "vocab.json", "merges.txt", "tokenizer_config.json", "preprocessor_config.json"):
        assert (tiny_dir / name).exists(), name
    assert "llm.lm_head.weight" not in index["weight_map"]
    cfg = json.loads((tiny_dir / "config.json").read_text())
    real = json.loads((Path(__file__).resolve().parents[2] / "lite/data/config.json").read_text())
    assert set(cfg) == set(real) and set(cfg["visual_generator_config"]) == set(real["visual_generator_config"])


def test_tiny_tokenizer_has_the_special_tokens(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, t
    text = "<|im_start|>user\nWhat is it?<|im_end|>\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["llm_config"]["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_make_tiny_then_load_gives_what_was_written(tmp_path, dtype):
    path = make_tiny(tmp_path / "ckpt", seed=3, dtype=dtype)
    stored = _stored(path)
    model, report = load_model(path, dtype=dtype, progress=False)
    state = model.state_dict()
    assert report.tensors == len(stored)
    for name, tensor in stored.items():
        assert tensor.dtype == dtype
        assert torch.equal(state[name], tensor), name
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight


def test_seed_changes_weights(tmp_path):
    a = _stored(make_tiny(tmp_path / "a", seed=1))
    b = _stored(make_tiny(tmp_path / "b", seed=2))
    assert not torch.equal(a["vte.weight"], b["vte.weight"])


def test_fp32_checkpoint_cast_to_bf16(tiny_dir):
    model, report = load_model(tiny_dir, dtype=torch.bfloat16, progress=False)
    assert report.stored_dtypes == {"torch.float32": report.tensors}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    stored = _stored(tiny_dir)
    assert torch.equal(model.vte.weight, stored["vte.weight"].to(torch.bfloat16))


def test_stored_lm_head_is_accepted_and_tied(tmp_path, tiny_dir):
    path = _copy(tiny_dir, tmp_path / "ckpt")
    shard = path / "model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    tensors["llm.lm_head.weight"] = tensors["llm.model.embed_tokens.weight"].clone()
    save_file(tensors, str(shard))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["llm.lm_head.weight"] = shard.name
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    model, _ = load_model(path, dtype=torch.float32, progress=False)
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight


def test_shards_are_globbed_without_an_index(tmp_path, tiny_dir):
    path = _copy(tiny_dir, tmp_path / "ckpt")
    (path / "model.safetensors.index.json").unlink()
    model, report = load_model(path, dtype=torch.float32, progress=False)
    assert report.tensors == len(_stored(tiny_dir))


def _rewrite(path: Path, edit) -> None:
    shard = path / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, str(shard))


def test_missing_tensor_is_named(tmp_path, tiny_dir):
    path = _copy(tiny_dir, tmp_path / "ckpt")
    _rewrite(path, lambda t: t.pop("visual_generator.backbone.img_in.bias"))
    (path / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): visual_generator.backbone.img_in.bias"):
        load_model(path, progress=False)


def test_misshaped_tensor_is_named(tmp_path, tiny_dir):
    path = _copy(tiny_dir, tmp_path / "ckpt")
    key = "visual_generator.backbone.final_layer.linear.weight"
    _rewrite(path, lambda t: t.__setitem__(key, torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match=rf"mis-shaped.*{key} \[3, 3\] \(expected \[16, 48\]\)"):
        load_model(path, progress=False)


def test_unexpected_tensor_is_named(tmp_path, tiny_dir):
    path = _copy(tiny_dir, tmp_path / "ckpt")
    _rewrite(path, lambda t: t.__setitem__("visual_generator.backbone.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor\(s\): visual_generator.backbone.extra.weight"):
        load_model(path, progress=False)


def test_truncated_shard_names_the_file(tmp_path, tiny_dir):
    path = _copy(tiny_dir, tmp_path / "ckpt")
    shard = path / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_model(path, progress=False)


def test_missing_shard_names_the_file(tmp_path, tiny_dir):
    path = _copy(tiny_dir, tmp_path / "ckpt")
    (path / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        load_model(path, progress=False)


def test_no_checkpoint_says_where_it_looked_and_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.delenv("OVIS_LITE_MODEL", raising=False)
    with pytest.raises(CheckpointError) as info:
        find_checkpoint(tmp_path / "nothing-here")
    msg = str(info.value)
    assert "nothing-here" in msg and "AIDC-AI/Ovis-U1-3B" in msg and "--model" in msg and "\n" not in msg


def test_hf_cache_snapshot_is_found(tmp_path, monkeypatch, tiny_dir):
    cache = tmp_path / "hub"
    snap = cache / "models--AIDC-AI--Ovis-U1-3B" / "snapshots" / "abc123"
    shutil.copytree(tiny_dir, snap)
    (cache / "models--AIDC-AI--Ovis-U1-3B" / "refs").mkdir()
    (cache / "models--AIDC-AI--Ovis-U1-3B" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("OVIS_LITE_MODEL", raising=False)
    assert find_checkpoint(None) == snap
