"""Reliability, checkpoints and configs: untrusted input refused in one line, before or while loading.

A seeded tiny checkpoint (`make_tiny`) is copied and corrupted the ways a hostile or broken
download would be: shard paths out of the folder, wrong dtypes, NaN weights, malformed index,
config and preprocessor files, unreadable files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from lite.errors import CheckpointError, ConfigError
from lite.model.checkpoint import load_model
from lite.model.config import load_config, load_preprocessor_config, parse_config
from lite.model.shards import INDEX_FILE, contained_file, first_non_finite, index_checkpoint
from tests.reliability_support import run_as_nobody
from lite.model.tiny import make_tiny, tiny_config_dict
from tests.reliability_support import run_cli, tree_snapshot


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rel") / "ckpt"
    make_tiny(out, seed=0)
    return out


@pytest.fixture
def ckpt(base_ckpt, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, free to corrupt."""
    return Path(shutil.copytree(base_ckpt, tmp_path / "ckpt"))


def _index(ckpt: Path) -> dict:
    return json.loads((ckpt / INDEX_FILE).read_text())


def _write_index(ckpt: Path, data: object) -> None:
    (ckpt / INDEX_FILE).write_text(json.dumps(data))


def _first_shard(ckpt: Path) -> tuple[str, Path]:
    """(a float weight's name, its shard)."""
    weight_map = _index(ckpt)["weight_map"]
    name = sorted(k for k in weight_map if k.endswith(".weight"))[0]
    return name, ckpt / weight_map[name]


def _rewrite(shard: Path, name: str, change) -> None:
    with safe_open(shard, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    tensors[name] = change(tensors[name])
    save_file(tensors, shard, metadata=metadata)


def _raises(kind, fn, *args) -> str:
    with pytest.raises(kind) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Shards: containment
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, fragment", [("../../x.safetensors", "'..'"), ("sub/../../x.safetensors", "'..'"),
                                           ("/etc/passwd", "absolute path"), ("", "must be a shard file name")])
def test_index_naming_a_shard_outside_the_folder_is_refused(ckpt, bad, fragment):
    data = _index(ckpt)
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = bad
    _write_index(ckpt, data)
    msg = _raises(CheckpointError, index_checkpoint, ckpt)
    assert fragment in msg and (repr(bad) in msg)


def test_symlinked_shard_pointing_out_is_refused(ckpt, tmp_path):
    _, shard = _first_shard(ckpt)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    assert "outside the checkpoint folder" in _raises(CheckpointError, index_checkpoint, ckpt)
    _write_index(ckpt, {"weight_map": {}})  # without an index the globbed shards are checked too
    (ckpt / INDEX_FILE).unlink()
    assert "outside the checkpoint folder" in _raises(CheckpointError, index_checkpoint, ckpt)


def test_symlinks_inside_the_folder_and_into_an_hf_cache_blobs_folder_are_fine(base_ckpt, tmp_path):
    repo = tmp_path / "models--AIDC-AI--Ovis-U1-3B"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in base_ckpt.iterdir():  # the HF cache layout: snapshot files are links to ../../blobs/<hash>
        shutil.copy(f, repo / "blobs" / f"h-{f.name}")
        (snap / f.name).symlink_to(Path("../../blobs") / f"h-{f.name}")
    assert len(index_checkpoint(snap)) == len(index_checkpoint(base_ckpt))
    assert contained_file(base_ckpt, "config.json", "file") == (base_ckpt / "config.json").resolve()
    with pytest.raises(CheckpointError):
        contained_file(snap, "../../blobs/h-config.json", "file")  # a '..' name is still refused


# ---------------------------------------------------------------------------------------------
# Shards: the index's structure, dtypes, finiteness, readability
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, fragment", [([1, 2], "top level"), ({"metadata": {}}, "'weight_map' is missing"),
                                            ({"weight_map": ["a"]}, "'weight_map' must be an object"),
                                            ({"weight_map": {"x.weight": 3}}, "'weight_map.x.weight'")])
def test_malformed_index_names_the_file_and_the_key(ckpt, data, fragment):
    _write_index(ckpt, data)
    msg = _raises(CheckpointError, index_checkpoint, ckpt)
    assert INDEX_FILE in msg and fragment in msg


def test_non_utf8_index_and_a_tensor_stored_twice(ckpt):
    name, shard = _first_shard(ckpt)
    (ckpt / INDEX_FILE).write_bytes(b'{"weight_map": {"\xff": 1}}')
    assert "not UTF-8" in _raises(CheckpointError, index_checkpoint, ckpt)
    (ckpt / INDEX_FILE).unlink()
    with safe_open(shard, framework="pt") as f:
        save_file({name: f.get_tensor(name)}, ckpt / "extra.safetensors")
    assert "stored twice" in _raises(CheckpointError, index_checkpoint, ckpt)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64, torch.float8_e4m3fn])
def test_float_weight_stored_as_a_non_float_dtype_is_refused(ckpt, dtype):
    name, shard = _first_shard(ckpt)
    _rewrite(shard, name, lambda t: t.to(dtype))
    msg = _raises(CheckpointError, load_model, ckpt, "cpu", torch.float32, None, False)
    stored = {torch.int8: "I8", torch.bool: "BOOL", torch.int64: "I64", torch.float8_e4m3fn: "F8_E4M3"}[dtype]
    assert f"tensor {name}" in msg and f"stored as {stored}" in msg and "floating" in msg and "BF16" in msg


def test_other_float_dtypes_are_accepted(ckpt):
    weight_map = _index(ckpt)["weight_map"]
    names = sorted(k for k in weight_map if k.endswith(".weight"))[:3]
    for name, dtype in zip(names, (torch.float16, torch.bfloat16, torch.float64)):
        _rewrite(ckpt / weight_map[name], name, lambda t, d=dtype: t.to(d))
    model, report = load_model(ckpt, "cpu", torch.float32, progress=False)
    assert all(model.get_parameter(n).dtype == torch.float32 for n in names)
    assert {"torch.float16", "torch.bfloat16", "torch.float64"} <= set(report.stored_dtypes)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_is_named_while_streaming(ckpt, bad):
    name, shard = _first_shard(ckpt)

    def poison(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[t.numel() // 2] = bad
        return t
    _rewrite(shard, name, poison)
    msg = _raises(CheckpointError, load_model, ckpt, "cpu", torch.float32, None, False)
    assert f"tensor {name} in {shard.name}" in msg and "non-finite" in msg


def test_first_non_finite_against_isfinite():
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.randn(3000, 7, generator=gen).to(dtype)
        assert first_non_finite(t) is None
        for at in (0, 4567, t.numel() - 1):
            u = t.clone()
            u.view(-1)[at] = float("nan")
            u.view(-1)[-1 if at != t.numel() - 1 else 0] = float("inf")
            expected = int((~torch.isfinite(u.view(-1))).nonzero()[0])
            assert first_non_finite(u) == expected
    assert first_non_finite(torch.arange(5)) is None
    assert first_non_finite(torch.full((4,), 60000.0, dtype=torch.float16)) is None  # large but finite


def test_shard_that_is_a_fifo_or_missing(ckpt):
    _, shard = _first_shard(ckpt)
    shard.unlink()
    assert "missing" in _raises(CheckpointError, index_checkpoint, ckpt)
    os.mkfifo(shard)
    assert "not a regular file" in _raises(CheckpointError, index_checkpoint, ckpt)


def test_unreadable_config_and_shard_are_one_line(base_ckpt):
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user (root reads mode-000 files)")
    folder = Path("/tmp") / f"ovis-rel-perm-{os.getpid()}"
    shutil.copytree(base_ckpt, folder / "ckpt")
    try:
        for p in (folder, folder / "ckpt"):
            p.chmod(0o755)
        for p in (folder / "ckpt").iterdir():
            p.chmod(0o644)
        (folder / "ckpt" / "config.json").chmod(0o000)
        msg = run_as_nobody(lambda: load_config(folder / "ckpt"))
        assert msg == f"config file {folder / 'ckpt' / 'config.json'} is not readable (permission denied)"
        _, shard = _first_shard(folder / "ckpt")
        shard.chmod(0o000)
        msg = run_as_nobody(lambda: index_checkpoint(folder / "ckpt"))
        assert "permission denied" in msg and shard.name in msg
    finally:
        shutil.rmtree(folder)


# ---------------------------------------------------------------------------------------------
# config.json and preprocessor_config.json
# ---------------------------------------------------------------------------------------------

def _mutated(change) -> dict:
    cfg = tiny_config_dict()
    change(cfg)
    return cfg


CONFIG_CASES = {
    "top-level list": ([1, 2], "the top level must be a JSON object"),
    "llm_config null": (_mutated(lambda c: c.__setitem__("llm_config", None)), "key 'llm_config' must be a JSON object"),
    "layers 'x'": (_mutated(lambda c: c["llm_config"].__setitem__("num_hidden_layers", "x")),
                   "key 'llm_config.num_hidden_layers' must be an integer"),
    "layers 0": (_mutated(lambda c: c["llm_config"].__setitem__("num_hidden_layers", 0)),
                 "key 'llm_config.num_hidden_layers' must be an integer >= 1"),
    "heads not dividing": (_mutated(lambda c: c["llm_config"].__setitem__("num_key_value_heads", 3)),
                           "'llm_config.num_attention_heads' (4) must be a multiple of"),
    "eps a string": (_mutated(lambda c: c["llm_config"].__setitem__("rms_norm_eps", "1e-6")),
                     "key 'llm_config.rms_norm_eps' must be a finite number"),
    "missing vocab": (_mutated(lambda c: c["visual_tokenizer_config"].pop("vocab_size")),
                      "key 'visual_tokenizer_config.vocab_size' is missing"),
    "missing generator": (_mutated(lambda c: c.pop("visual_generator_config")),
                          "key 'visual_generator_config' is missing"),
    "patch 0": (_mutated(lambda c: c["visual_tokenizer_config"]["backbone_config"].__setitem__("patch_size", 0)),
                "key 'visual_tokenizer_config.backbone_config.patch_size' must be an integer >= 1"),
    "axes odd": (_mutated(lambda c: c["visual_generator_config"].__setitem__("axes_dim", [5, 9, 10])),
                 "key 'visual_generator_config.axes_dim' must be a list of 3 even integers"),
    "axes wrong type": (_mutated(lambda c: c["visual_generator_config"].__setitem__("axes_dim", "16,56,56")),
                        "key 'visual_generator_config.axes_dim' must be a list of 3 integers"),
    "vae null": (_mutated(lambda c: c["visual_generator_config"].__setitem__("vae_config", None)),
                 "key 'visual_generator_config.vae_config' is missing or empty"),
    "vae scaling inf": (_mutated(lambda c: c["visual_generator_config"]["vae_config"].__setitem__(
        "scaling_factor", float("inf"))), "key 'visual_generator_config.vae_config.scaling_factor' must be a finite"),
    "qkv_bias a string": (_mutated(lambda c: c["visual_generator_config"].__setitem__("qkv_bias", "yes")),
                          "key 'visual_generator_config.qkv_bias' must be true or false"),
    "eos out of vocab": (_mutated(lambda c: c["llm_config"].__setitem__("eos_token_id", 10 ** 9)),
                         "key 'llm_config.eos_token_id' must be an integer between 0 and"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_malformed_config_names_the_file_and_the_key(case):
    data, fragment = CONFIG_CASES[case]
    msg = _raises(ConfigError, parse_config, data, "/m/config.json")
    assert msg.startswith("/m/config.json: ") and fragment in msg, msg


def test_the_real_and_tiny_configs_still_parse():
    from lite.model.tiny import real_config_template

    assert parse_config(real_config_template()).yak.head_dim == 128
    assert parse_config(tiny_config_dict()).vision.hidden_size == 64


def test_config_files_that_cannot_be_read(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_bytes(b'{"llm_config": "\xff\xfe"}')
    assert "not UTF-8 text (byte 0xff at offset 16)" in _raises(ConfigError, load_config, cfg)
    cfg.unlink()
    cfg.mkdir()
    assert "is a directory" in _raises(ConfigError, load_config, tmp_path)
    cfg.rmdir()
    os.mkfifo(cfg)
    assert "not a regular file" in _raises(ConfigError, load_config, tmp_path)  # and it did not block
    cfg.unlink()
    cfg.write_text("{oops")
    assert "not valid JSON" in _raises(ConfigError, load_config, cfg)
    cfg.write_text("[" * 100000 + "]" * 100000)
    assert str(cfg) in _raises(ConfigError, load_config, cfg)


@pytest.mark.parametrize("change, fragment", [
    ({"patch_size": 0}, "key 'patch_size' must be an integer >= 1"),
    ({"hidden_stride": "2"}, "key 'hidden_stride' must be an integer"),
    ({"min_pixels": -5}, "key 'min_pixels' must be an integer >= 1"),
    ({"min_pixels": 20000, "max_pixels": 10000}, "'max_pixels' (10000) must be >= 'min_pixels' (20000)"),
    ({"min_pixels": 100}, "key 'min_pixels' (100) must be at least 3136"),
    ({"image_std": [0.2, 0.0, 0.3]}, "key 'image_std' must be a list of 3 finite numbers > 0"),
    ({"image_mean": [0.5]}, "key 'image_mean' must be a list of 3"),
])
def test_invalid_preprocessor_config_is_one_line(tmp_path, change, fragment):
    path = tmp_path / "preprocessor_config.json"
    data = json.loads((Path(__file__).parents[2] / "lite" / "data" / "preprocessor_config.json").read_text())
    path.write_text(json.dumps({**data, **change}))
    msg = _raises(ConfigError, load_preprocessor_config, tmp_path)
    assert msg.startswith(f"{path}: ") and fragment in msg
    path.write_text("[]")
    assert "top level" in _raises(ConfigError, load_preprocessor_config, tmp_path)


def test_preprocessor_must_match_the_models_vit(tmp_path):
    data = json.loads((Path(__file__).parents[2] / "lite" / "data" / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**data, "patch_size": 16}))
    vision = parse_config(tiny_config_dict()).vision
    msg = _raises(ConfigError, load_preprocessor_config, tmp_path, vision)
    assert "'patch_size' (16) differs from the model's config.json (14)" in msg


# ---------------------------------------------------------------------------------------------
# Through the CLI, in a real process: one line, exit 2, the user's checkpoint untouched
# ---------------------------------------------------------------------------------------------

def _escape(ckpt: Path) -> str:
    data = _index(ckpt)
    data["weight_map"][next(iter(data["weight_map"]))] = "../../x.safetensors"
    _write_index(ckpt, data)
    return "'..'"


def _nan(ckpt: Path) -> str:
    name, shard = _first_shard(ckpt)
    _rewrite(shard, name, lambda t: torch.full_like(t, float("nan")))
    return f"tensor {name} in {shard.name} holds a non-finite value"


def _pp_zero(ckpt: Path) -> str:
    data = json.loads((ckpt / "preprocessor_config.json").read_text())
    (ckpt / "preprocessor_config.json").write_text(json.dumps({**data, "patch_size": 0}))
    return "preprocessor_config.json: key 'patch_size' must be an integer >= 1"


def _qwen3_rejects(ckpt: Path) -> str:
    # Our own parse accepts any rope_scaling object; transformers' Qwen3Config (run before loading, not while a
    # table is drawn) wants a factor for "linear".
    data = json.loads((ckpt / "config.json").read_text())
    data["llm_config"]["rope_scaling"] = {"rope_type": "linear"}
    (ckpt / "config.json").write_text(json.dumps(data))
    return "config.json: key 'llm_config' is not a valid Qwen3 config"


# Four real processes (one fault found from the index, one while streaming, one in a config file);
# the other corruptions run the same code through the API above, and each CLI start costs seconds.
@pytest.mark.parametrize("corrupt", [_escape, _nan, _pp_zero, _qwen3_rejects],
                         ids=["index-escape", "nan-weight", "preprocessor-zero", "qwen3-config"])
def test_cli_corrupt_checkpoint_is_one_line(ckpt, tmp_path, corrupt):
    fragment = corrupt(ckpt)
    image = tmp_path / "img.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(image)
    before = tree_snapshot(tmp_path)
    res = run_cli("ask", "--model", ckpt, "--device", "cpu", "--quiet", "--max-new-tokens", "2", image, "what?",
                  cwd=tmp_path, timeout=120)
    res.assert_one_line_error(fragment)
    assert tree_snapshot(tmp_path) == before
