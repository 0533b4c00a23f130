"""Shared fixtures: the reference's golden set and seeded tiny checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The decode threads follow the load unless pinned, and the thread count can flip the tiny random model's
# near-tied greedy tokens: tests that compare answers bitwise must not depend on what else the machine runs.
os.environ.setdefault("OVIS_LITE_DECODE_THREADS", "2")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OVIS_LITE_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"
REAL_CONFIG = SHARED / "ovis_u1_3b"


@pytest.fixture(scope="session")
def golden() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = GOLDEN / "golden.safetensors"
    if not path.exists():
        pytest.skip(f"golden fixtures not found at {path}")
    return load_file(path)


@pytest.fixture(scope="session")
def golden_model():
    """The reference's tiny checkpoint, loaded through our own loader in float32."""
    from lite.model.checkpoint import load_model

    if not (GOLDEN / "tiny_ckpt").exists():
        pytest.skip("golden tiny checkpoint not found")
    model, _ = load_model(GOLDEN / "tiny_ckpt", device="cpu", dtype=torch.float32, progress=False)
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A seeded tiny checkpoint in the real HF layout, written by `make_tiny`."""
    from lite.model.tiny import make_tiny

    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    make_tiny(out, seed=0)
    return out
