"""What the CLI hands the runtime (one resolved run) and what it says about the device, before loading."""

from __future__ import annotations

import pytest

from lite.cli.main import main
from lite.errors import CheckpointError


@pytest.fixture
def handed(monkeypatch):
    """Capture the resolved run handed to `OvisPipeline.load`, then stop (one line, exit 2) instead of loading."""
    from lite.runtime.pipeline import OvisPipeline

    calls: list = []

    def stop(run):
        calls.append(run)
        raise CheckpointError("stopped by the test before loading")

    monkeypatch.setattr(OvisPipeline, "load", stop)
    return calls


def test_vram_without_a_gpu_says_the_run_uses_the_cpu(capsys, tmp_path, tiny_dir, handed):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code = main(["generate", "a cat", "-o", str(tmp_path / "a.png"), "--model", str(tiny_dir), "--vram", "6GB"])
    err = capsys.readouterr().err
    assert code == 2 and len(handed) == 1
    assert handed[0].device.type == "cpu" and handed[0].progress is False  # stderr is not a terminal
    assert "assumed" in err and "--vram" in err and "uses the CPU" in err
    assert "CUDA with 6.0 of 6.0 GiB free" not in err


def test_quiet_silences_notices_and_the_run_is_resolved_once(capsys, tmp_path, tiny_dir, handed):
    code = main(["generate", "a cat", "-o", str(tmp_path / "a.png"), "--model", str(tiny_dir), "--device", "cpu",
                 "--preset", "balanced", "--quiet", "--dtype", "fp32"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1  # only the error itself
    (call,) = handed
    from lite.runtime.presets import PRESETS

    assert call.directory == tiny_dir and str(call.dtype) == "torch.float32" and call.preset is PRESETS["balanced"]
    assert call.budget_bytes == PRESETS["balanced"].budget_bytes  # no free-memory cap without a GPU


def test_threads_reach_torch(capsys, tmp_path, tiny_dir, handed):
    import torch

    before = torch.get_num_threads()
    try:
        main(["generate", "a cat", "-o", str(tmp_path / "a.png"), "--model", str(tiny_dir), "--device", "cpu",
              "--threads", "1", "--quiet"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
