"""`plan` and `presets` on the shipped config: budgets with a preset, agreement, and the device planned for."""

from __future__ import annotations

import json

import pytest

from lite.cli.main import main
from lite.runtime.presets import PRESETS

GiB = 1 << 30


def run_json(capsys, *argv: str):
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_plan_with_a_preset_and_another_budget(capsys):
    result = run_json(capsys, "plan", "--preset", "tiny", "--budget", "3GB")
    assert result["preset"] == "tiny" and result["budget_bytes"] == 3 * GiB
    assert result["planned_peak_bytes"] <= 3 * GiB and result["nfe"] == PRESETS["tiny"].nfe("t2i")
    smaller = run_json(capsys, "plan", "--preset", "tiny", "--budget", "2GB")
    assert smaller["planned_peak_bytes"] <= 2 * GiB < result["budget_bytes"]


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_a_budget_alone_falls_back_to_a_preset_that_fits(capsys, task):
    """The README's examples: bf16 cannot fit 4 GB at 1024x1024, so the most precise fitting preset plans."""
    budget = "4GB" if task == "t2i" else "3GB"
    result = run_json(capsys, "plan", "--task", task, "--budget", budget, "--device", "cuda")
    assert result["planned_peak_bytes"] <= int(budget[0]) * GiB
    assert result["preset"] in PRESETS and result["note"] and "bf16 needs" in result["note"]
    order = [p.name for p in PRESETS.values() if p.offload and p.budget_bytes]
    for earlier in order[:order.index(result["preset"])]:  # every more precise preset really does not fit
        code = main(["plan", "--task", task, "--preset", earlier, "--budget", budget, "--device", "cuda"])
        err = capsys.readouterr().err
        assert code == 2 and "smallest budget" in err


def test_the_plan_of_each_preset_agrees_with_presets(capsys):
    rows = {r["name"]: r for r in run_json(capsys, "presets")}
    for name, preset in PRESETS.items():
        row = rows[name]
        for key, task in (("t2i_1024", "t2i"), ("edit_1024", "edit"), ("understand", "understand")):
            code = main(["plan", "--preset", name, "--task", task, "--json"])
            out, err = capsys.readouterr()
            if row["planned_peak_bytes"][key] is None:  # the table says it cannot plan: plan refuses
                assert code == 2, out
                continue
            result = json.loads(out)
            assert result["device"] == row["planned_for"], name
            assert result["planned_peak_bytes"] == row["planned_peak_bytes"][key], (name, task)
        assert row["nfe"]["t2i"] == preset.nfe("t2i")


def test_plan_without_a_budget_is_all_resident_and_says_so(capsys):
    code = main(["plan", "--task", "understand"])
    out = capsys.readouterr().out
    assert code == 0 and "nan" not in out and "all resident" in out


def test_plan_plans_for_the_device_told_or_the_presets_own(capsys):
    assert run_json(capsys, "plan", "--preset", "cpu")["device"] == "cpu"
    assert run_json(capsys, "plan", "--preset", "balanced")["device"] == "cuda"
    assert run_json(capsys, "plan", "--device", "cpu", "--task", "understand")["device"] == "cpu"
    assert run_json(capsys, "plan", "--device", "cuda", "--task", "understand")["device"] == "cuda"


def test_a_resident_preset_over_the_budget_is_refused(capsys):
    code = main(["plan", "--preset", "reference", "--budget", "2GB"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "keeps every weight on the device" in err
