"""The runtime tests' shared pipeline: the seeded tiny checkpoint in fp32 on the CPU, one per test module (a
module that needs another defines its own `pipe`)."""

from __future__ import annotations

import pytest
import torch

from lite.runtime.pipeline import OvisPipeline


@pytest.fixture(scope="module")
def pipe(tiny_dir) -> OvisPipeline:
    return OvisPipeline.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32, progress=False)
