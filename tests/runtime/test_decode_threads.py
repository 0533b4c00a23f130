"""The decode thread policy: the /proc/stat reading and the choice made from it (counted by hand)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from lite.runtime.decode_threads import choose_threads, read_busy_ticks

STAT = """cpu  100 0 50 1000 7 0 0 0 0 0
cpu0 10 1 5 500 3 2 1 4 0 0
cpu1 90 0 45 500 4 0 0 0 0 0
intr 123
"""


def test_busy_ticks_of_the_allowed_cpus_only(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text(STAT)
    assert read_busy_ticks({0}, str(stat)) == 10 + 1 + 5 + 2 + 1 + 4  # idle and iowait are not busy
    assert read_busy_ticks({0, 1}, str(stat)) == 23 + 135
    assert read_busy_ticks({0}, str(tmp_path / "missing")) is None


@pytest.mark.parametrize("cores, others, limit, expected", [
    (2, 0.0, 2, 2),  # quiet: every core
    (2, 0.25, 2, 2),  # a light neighbour leaves the core mostly free
    (2, 0.5, 2, 1),  # half a core taken: a thread there would stall every barrier
    (2, 1.0, 2, 1),
    (2, 3.0, 2, 1),  # never fewer than one
    (2, 0.0, 1, 1),  # never more than asked
    (16, 3.5, 16, 12),
])
def test_one_thread_per_core_left_free(cores: int, others: float, limit: int, expected: int) -> None:
    assert choose_threads(cores, others, limit) == expected


def test_the_environment_pins_the_decode_threads(monkeypatch) -> None:
    from lite.runtime.decode_threads import PIN_ENV, pinned_threads

    monkeypatch.setenv(PIN_ENV, "1")
    assert pinned_threads(2) == 1
    monkeypatch.setenv(PIN_ENV, "8")
    assert pinned_threads(2) == 2  # never more than the run's threads
    monkeypatch.setenv(PIN_ENV, "0")
    assert pinned_threads(2) == 1
    monkeypatch.setenv(PIN_ENV, "auto")
    assert pinned_threads(2) is None
    monkeypatch.delenv(PIN_ENV)
    assert pinned_threads(2) is None


def test_passive_openmp_threads_decode_with_every_thread_whatever_the_load(monkeypatch, tmp_path: Path) -> None:
    """Sleeping threads cost nothing at a barrier and earn a scheduler share each: the measured winner under load
    (docs/BENCHMARKS.md); spinning ones follow the free cores."""
    from lite.runtime import decode_threads as dt
    from lite.runtime.cpu.plan import PROCESS, WaitPolicy

    monkeypatch.delenv(dt.PIN_ENV, raising=False)
    busy = itertools.count(0, 2 * 100)  # each 1 s window: both cores busy (100 ticks/s each), none of it ours
    monkeypatch.setattr(dt, "read_busy_ticks", lambda cpus: next(busy))
    monkeypatch.setattr(dt, "_own_cpu_seconds", lambda: 0.0)
    monkeypatch.setattr(dt, "_allowed_cpus", lambda: {0, 1})
    monkeypatch.setattr(dt.time, "perf_counter", itertools.count(0.0, 1.0).__next__)
    monkeypatch.setattr(dt.os, "sysconf", lambda name: 100)

    monkeypatch.setattr(PROCESS, "wait", WaitPolicy("default", "test"))
    assert dt.CoreWindow.start().decode_threads(2)[0] == 1  # spinning: the taken cores get no thread
    monkeypatch.setattr(PROCESS, "wait", WaitPolicy("PASSIVE", "test"))
    threads, reason = dt.CoreWindow.start().decode_threads(2)
    assert threads == 2 and "PASSIVE" in reason
    # llama.cpp's pool spins at its barriers whatever OpenMP does: the free cores again
    assert dt.CoreWindow.start().decode_threads(2, spinning=True)[0] == 1
    monkeypatch.setattr(PROCESS, "wait", None)
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")  # the API without the CLI: the environment says it
    assert dt.waits_passively()
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert not dt.waits_passively()
