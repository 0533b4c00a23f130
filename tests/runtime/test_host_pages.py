"""Mapped checkpoint pages leave the RSS once read (loader) and while a phase does not use them (issue 26, item 5).

Residency is read independently of the code under test: from the `Rss:` of the file's own mappings in
`/proc/self/smaps`. Results must not change: the released pages fault back in from the file.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lite.memory import HostPeakSampler, host_memory, release_file_pages, tensor_span

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def resident_bytes_of(path_part: str) -> int:
    """Resident bytes of every mapping of files whose path contains `path_part` (smaps' own count)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            inside = len(head) >= 6 and path_part in line
        elif inside and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


def mapped_file(tmp_path: Path, nbytes: int = 8 << 20) -> torch.Tensor:
    """A float32 tensor viewing a private file mapping, as safetensors maps shards."""
    path = tmp_path / "weights.bin"
    torch.arange(nbytes // 4, dtype=torch.float32).numpy().tofile(path)
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=nbytes)
    return torch.tensor([], dtype=torch.float32).set_(storage).view(-1)


def test_released_pages_leave_the_rss_and_the_data_stays(tmp_path: Path) -> None:
    t = mapped_file(tmp_path)
    expected = torch.arange(t.numel(), dtype=torch.float32)
    assert torch.equal(t, expected)  # touches every page
    assert resident_bytes_of(str(tmp_path)) >= 8 << 20
    released = release_file_pages([tensor_span(t)])
    assert released == 8 << 20
    assert resident_bytes_of(str(tmp_path)) < 1 << 20
    assert torch.equal(t, expected)  # faulted back in from the file


def test_a_mapping_with_a_written_page_is_left_alone(tmp_path: Path) -> None:
    t = mapped_file(tmp_path)
    t[5] = -1.0  # a private copy of that page: dropping it would lose the write
    assert release_file_pages([tensor_span(t)]) == 0
    assert t[5].item() == -1.0 and t[6].item() == 6.0


def test_anonymous_memory_is_never_released() -> None:
    t = torch.ones(4 << 20)
    assert release_file_pages([tensor_span(t)]) == 0
    assert bool((t == 1).all())


def test_sampler_sees_an_allocation(tmp_path: Path) -> None:
    with HostPeakSampler(interval=0.001) as peak:
        before = host_memory()
        block = torch.ones(64 << 20, dtype=torch.uint8)
        peak.sample()
        del block
    assert before is not None and peak.peak_anon >= before.anon + (60 << 20)
    assert peak.peak_rss >= peak.peak_anon and peak.peak_mapped > 0


def whole_pages_inside_tensors(directory: Path, page: int = 4096) -> int:
    """From the shards' own headers: bytes of the pages lying wholly inside one tensor's data."""
    total = 0
    for shard in directory.glob("*.safetensors"):
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        for name, entry in header.items():
            if name != "__metadata__":
                lo, hi = (8 + n + o for o in entry["data_offsets"])
                total += max(0, hi // page - -(-lo // page)) * page
    return total


def test_the_loader_drops_the_pages_it_read(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lite.model import checkpoint

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "release_file_pages", lambda spans: 0)
        model, _ = checkpoint.load_model(tiny_dir, device="cpu", dtype=torch.float32, progress=False)
        kept = resident_bytes_of(str(tiny_dir))
        del model
    gc.collect()
    model, report = checkpoint.load_model(tiny_dir, device="cpu", dtype=torch.float32, progress=False)  # views
    dropped = kept - resident_bytes_of(str(tiny_dir))
    expected = whole_pages_inside_tensors(tiny_dir)
    assert expected > 0 and dropped >= 0.9 * expected and report.released_bytes >= expected
    stored = {}
    for shard in sorted(tiny_dir.glob("*.safetensors")):
        stored.update(load_file(shard))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in stored.items())  # the values read back from the file


def test_phases_release_what_they_do_not_use_and_results_do_not_change(tiny_dir: Path) -> None:
    from lite.runtime.host_pages import PhasePageRelease
    from lite.runtime.pipeline import OvisPipeline

    pipe = OvisPipeline.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32, progress=False)
    listeners = [x for x in pipe.phase_listeners if isinstance(x, PhasePageRelease)]
    assert len(listeners) == 1
    first = pipe.generate("a red cat", width=64, height=64, steps=2, seed=3)
    released_once = listeners[0].released_bytes
    assert released_once > 0  # conditions -> denoise -> decode dropped the pages the next phase does not use
    listeners[0]("decode")
    pipe.phase_listeners.remove(listeners[0])
    second = pipe.generate("a red cat", width=64, height=64, steps=2, seed=3)
    assert first.image.tobytes() == second.image.tobytes()  # same pixels with and without releasing
