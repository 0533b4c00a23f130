"""Every file check comes before any weight is read (issue 26, item 3).

The shards of these checkpoints hold NaN in every tensor: a loader that read any weight first would stop
with "non-finite value". Getting the file's own error instead shows the check ran first.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lite.errors import CheckpointError, ConfigError, TokenizerError
from lite.model.preflight import check_checkpoint_files


def _poisoned_copy(tiny_dir: Path, dest: Path) -> Path:
    """A copy of the tiny checkpoint whose tensor data is all NaN (0xFF bytes), headers intact."""
    shutil.copytree(tiny_dir, dest)
    for shard in dest.glob("*.safetensors"):
        data = bytearray(shard.read_bytes())
        start = 8 + int.from_bytes(data[:8], "little")
        data[start:] = b"\xff" * (len(data) - start)
        shard.write_bytes(bytes(data))
    return dest


@pytest.fixture
def poisoned(tiny_dir: Path, tmp_path: Path) -> Path:
    return _poisoned_copy(tiny_dir, tmp_path / "ckpt")


def test_cli_refuses_a_checkpoint_without_tokenizer_before_loading(poisoned: Path) -> None:
    (poisoned / "vocab.json").unlink()
    (poisoned / "merges.txt").unlink()
    proc = subprocess.run([sys.executable, "-m", "lite", "ask", "What is it?", "--model", str(poisoned)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ovis-lite: error: ") and "has no tokenizer" in lines[0]
    assert "vocab.json + merges.txt" in lines[0]


def test_the_python_api_checks_files_first_too(poisoned: Path) -> None:
    from lite.runtime.pipeline import OvisPipeline

    (poisoned / "merges.txt").unlink()
    with pytest.raises(TokenizerError, match="has no tokenizer"):
        OvisPipeline.from_pretrained(poisoned, device="cpu", progress=False)


def test_a_tokenizer_that_does_not_load_is_refused_before_the_weights(poisoned: Path) -> None:
    from lite.runtime.pipeline import OvisPipeline

    (poisoned / "vocab.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load the tokenizer"):
        OvisPipeline.from_pretrained(poisoned, device="cpu", progress=False)


def test_shard_headers_are_checked_against_the_config(poisoned: Path) -> None:
    config = json.loads((poisoned / "config.json").read_text())
    config["llm_config"]["intermediate_size"] += 32  # the stored MLP weights no longer fit
    (poisoned / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mis-shaped tensor"):
        check_checkpoint_files(poisoned)


def test_configs_come_first(poisoned: Path) -> None:
    (poisoned / "vocab.json").unlink()
    (poisoned / "preprocessor_config.json").write_text("[]")
    with pytest.raises(ConfigError, match="preprocessor"):
        check_checkpoint_files(poisoned)
    (poisoned / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        check_checkpoint_files(poisoned)


def test_a_missing_shard_named_by_the_index_is_refused(poisoned: Path) -> None:
    next(poisoned.glob("*-00002.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        check_checkpoint_files(poisoned)


def test_a_complete_checkpoint_passes(tiny_dir: Path) -> None:
    config, pp = check_checkpoint_files(tiny_dir)
    assert config.llm["hidden_size"] == 64 and pp.max_pixels == 12544
