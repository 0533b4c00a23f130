"""Presets: planned peaks within budgets, the automatic choice for simulated machines, CLI errors."""

from __future__ import annotations

import json

import pytest

from lite.cli.main import main
from lite.model.config import PreprocessorConfig, load_config
from lite.errors import InputError
from lite.runtime.machine import GiB, Machine
from lite.runtime.planning import check_fits, choose_preset, plan_preset, preset_table
from lite.runtime.presets import PRESETS
from lite.validation import parse_bytes

from tests.conftest import REAL_CONFIG


@pytest.fixture(scope="module")
def real():
    return load_config(REAL_CONFIG / "config.json"), PreprocessorConfig()


@pytest.fixture(scope="module")
def table(real):
    return preset_table(*real, device_type="cuda")


def test_presets_json_lists_them_all(capsys):
    assert main(["presets", "--json", "--config", str(REAL_CONFIG / "config.json")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) >= 6
    names = [r["name"] for r in rows]
    assert names[:6] == ["reference", "quality", "balanced", "low", "tiny", "minimal"] and "mps" in names
    for r in rows:
        assert r["description"] and r["solver"] and r["steps"] >= 1
        assert set(r["nfe"]) == {"t2i", "edit"} and set(r["planned_peak_bytes"]) == {"understand", "t2i_1024",
                                                                                      "edit_1024"}


def test_every_plan_stays_within_its_budget(table):
    for row in table:
        if row["budget_bytes"] is None:
            continue
        for task, peak in row["planned_peak_bytes"].items():
            assert 0 < peak <= row["budget_bytes"], (row["name"], task, peak)


def test_fast_presets_meet_the_nfe_targets(table):
    for row in table:
        if row["name"] not in ("reference", "quality"):
            assert row["nfe"]["t2i"] <= 24 and row["nfe"]["edit"] <= 36, row["name"]
    ref = next(r for r in table if r["name"] == "reference")
    assert ref["nfe"] == {"t2i": 100, "edit": 150}


def test_balanced_plan_keeps_the_denoise_loop_resident(real):
    p = plan_preset(PRESETS["balanced"], *real, "t2i", 1024, 1024, "cuda")
    assert p.planned_peak_bytes <= 4 * GiB
    assert not [u for u in p.paged_units if u.startswith("yak")]


def test_smaller_presets_plan_smaller_peaks(table):
    peaks = {r["name"]: r["planned_peak_bytes"]["t2i_1024"] for r in table}
    assert peaks["reference"] > peaks["quality"] > peaks["balanced"] >= peaks["low"] >= peaks["minimal"]


@pytest.mark.parametrize("machine, task, expected", [
    (Machine("cuda", 8 * GiB, 8 * GiB, 32 * GiB), "t2i", "balanced"),
    (Machine("cuda", 8 * GiB, 8 * GiB, 32 * GiB), "edit", "balanced"),
    (Machine("cuda", 4 * GiB, 4 * GiB, 16 * GiB), "t2i", "tiny"),
    (Machine("cuda", 4 * GiB, 4 * GiB, 16 * GiB), "understand", "tiny"),
    (Machine("mps", int(10.7 * GiB), int(10.7 * GiB), 16 * GiB), "edit", "mps"),
    (Machine("cpu", None, None, 16 * GiB), "t2i", "cpu"),
    (Machine("cuda", 24 * GiB, 22 * GiB, 64 * GiB), "edit", "reference"),
])
def test_automatic_choice_for_simulated_machines(real, machine, task, expected):
    preset, why = choose_preset(machine, *real, task, 1024, 1024)
    assert preset.name == expected, why
    assert why.startswith(f"preset {expected}:") and "\n" not in why


def test_a_resolution_too_large_names_the_largest_that_fits(real):
    with pytest.raises(InputError, match=r"largest square size that fits is \d+x\d+"):
        check_fits(PRESETS["minimal"], *real, "t2i", 4096, 4096, Machine("cuda", 2 * GiB, 2 * GiB, 16 * GiB))


def test_unknown_preset_is_a_one_line_cli_error(capsys, tmp_path):
    code = main(["generate", "a cat", "-o", str(tmp_path / "a.png"), "--preset", "turbo"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "unknown preset 'turbo'" in err and "balanced" in err


def test_too_large_resolution_is_a_one_line_cli_error(capsys, tmp_path, tiny_dir):
    code = main(["generate", "a cat", "-o", str(tmp_path / "a.png"), "--model", str(tiny_dir), "--preset",
                 "minimal", "--vram", "40MB", "--width", "4096", "--height", "4096", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "fits" in err, err


@pytest.mark.parametrize("text, expected", [("6GB", 6 * GiB), ("512MB", 512 << 20), ("2.5 GiB", int(2.5 * GiB))])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_a_bare_number_is_refused_as_ambiguous():
    # "8" could be 8 bytes or 8 GiB (issue 12): a size needs its unit
    with pytest.raises(InputError, match="no unit"):
        parse_bytes("8")


def test_plan_command_json(capsys):
    # bf16 weights with the reference's fp32, untiled VAE: a 512x512 edit pages to fit 3 GB
    # (at 1024x1024 its decode alone needs more than 3 GB, see test_plan_refuses_an_impossible_budget).
    assert main(["plan", "--config", str(REAL_CONFIG / "config.json"), "--task", "edit", "--width", "512",
                 "--height", "512", "--budget", "3GB", "--device", "cuda", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("budget_bytes", "planned_peak_bytes", "resident_weight_bytes", "paged_units", "nfe"):
        assert key in result
    assert result["budget_bytes"] == 3 * GiB and result["planned_peak_bytes"] <= 3 * GiB
    assert result["paged_units"] and result["nfe"] == 150


def test_plan_refuses_an_impossible_budget(capsys):
    code = main(["plan", "--config", str(REAL_CONFIG / "config.json"), "--budget", "1GB", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "smallest budget that works" in err and err.count("\n") == 1


def test_the_readme_table_is_the_presets_table(real):
    """The README's table is generated (`ovis-lite presets --markdown`): it must equal what the presets plan now."""
    import re
    from pathlib import Path

    from lite.runtime.planning import preset_markdown

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    found = re.search(r"<!-- presets:begin[^>]*-->\n(.*?)\n<!-- presets:end -->", readme, flags=re.S)
    assert found, "README lost its preset table markers"
    assert found.group(1) == preset_markdown(*real)
