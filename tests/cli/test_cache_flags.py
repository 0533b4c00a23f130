"""`generate -b 3 --json`: images 2 and 3 take their conditions from the cache (hits, a conditions phase in the
JSON), with the same bytes as `--no-cache`, which turns every cache off."""

from __future__ import annotations

import json

import pytest

from lite.cli.main import main


def _run(capsys, *argv: str) -> list[dict]:
    assert main(list(argv)) == 0
    out, _ = capsys.readouterr()
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture
def fast(tiny_dir) -> list[str]:
    return ["--model", str(tiny_dir), "--device", "cpu", "--dtype", "fp32", "--preset", "reference", "--quiet",
            "--steps", "1", "--width", "32", "--height", "32", "--json", "--seed", "5"]


def test_a_batch_reuses_its_conditions_and_no_cache_turns_that_off(capsys, tmp_path, fast) -> None:
    cached = _run(capsys, "generate", "a red fox", "-o", str(tmp_path / "a.png"), "-b", "3", *fast)
    assert len(cached) == 3 and all("conditions" in r["phases"] for r in cached)
    conditions = [r["cache"]["conditions"] for r in cached]
    assert [(c["hits"], c["misses"]) for c in conditions] == [(0, 2), (2, 2), (4, 2)]
    plain = _run(capsys, "generate", "a red fox", "-o", str(tmp_path / "b.png"), "-b", "3", "--no-cache", *fast)
    assert all(r["cache"]["enabled"] is False and r["cache"]["conditions"]["hits"] == 0 for r in plain)
    for a, b in zip(cached, plain):
        assert open(a["output"], "rb").read() == open(b["output"], "rb").read()


def test_chat_stats_names_each_caches_counts(capsys) -> None:
    import argparse
    from types import SimpleNamespace

    from lite.cli.chat import Conversation, _command
    from lite.runtime.caches import RuntimeCaches

    caches = RuntimeCaches(budget_bytes=8 << 20)
    caches.vision.put("img", "x", 1 << 20)  # inside the vision share (15% of 8 MiB)
    caches.vision.get("img")
    caches.conditions.get("none")
    args = argparse.Namespace(quiet=False)
    assert _command(Conversation(), "/stats", args, SimpleNamespace(caches=caches))
    err = capsys.readouterr().err
    assert "vision 1 hits / 0 misses, 1 entries, 1.0 MiB" in err and "conditions 0 hits / 1 misses" in err
    caches.set_enabled(False)
    _command(Conversation(), "/stats", args, SimpleNamespace(caches=caches))
    assert "(off: --no-cache)" in capsys.readouterr().err
