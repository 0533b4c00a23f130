"""The CPU plan is visible: the load report's block, and `cpu_plan` in `generate --json` and `ask --json`."""

from __future__ import annotations

import json

from PIL import Image

from lite.cli.main import main

KEYS = {"compute", "packed", "one_row_kernel", "int4_layout", "threads", "wait_policy", "decode_threads"}


def _common(tiny_dir) -> list[str]:
    return ["--model", str(tiny_dir), "--device", "cpu", "--preset", "cpu", "--steps", "1", "--width", "32",
            "--height", "32"]


def test_generate_reports_the_plan_at_load_and_in_json(capsys, tmp_path, tiny_dir) -> None:
    code = main(["generate", "a fox", "-o", str(tmp_path / "fox.png"), "--json", *_common(tiny_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    plan = result["cpu_plan"]
    assert KEYS <= set(plan) and all(plan[k]["reason"] for k in KEYS)
    assert plan["compute"]["value"] in ("bf16", "fp32") and isinstance(plan["packed_layers"], int)
    assert (plan["compute"]["value"] == "bf16") == plan["native_bf16"]
    assert result["settings"]["dtype"] == plan["compute"]["value"]  # the run computed in the plan's dtype
    assert "cpu_plan" not in result["machine"]
    # the load report: a short block that says what the JSON says
    lines = err.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ovis-lite: cpu plan: "))
    choices, because = lines[start + 1], lines[start + 2]
    assert f"compute {plan['compute']['value']}, packed Linears {plan['packed_layers']}" in choices
    assert f"one-row kernel {plan['one_row_kernel']['value']}, int4 layout {plan['int4_layout']['value']}" in choices
    assert f"threads {plan['threads']['value']}, OpenMP wait {plan['wait_policy']['value']}" in choices
    assert plan["compute"]["reason"] in because and plan["wait_policy"]["reason"] in because
    assert Image.open(tmp_path / "fox.png").size == (32, 32)


def test_ask_json_carries_the_plan(capsys, tmp_path, tiny_dir) -> None:
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    code = main(["ask", str(image), "What is it?", "--max-new-tokens", "2", "--json", "--quiet",
                 *_common(tiny_dir)[:6]])
    out, err = capsys.readouterr()
    assert code == 0, err
    plan = json.loads(out.strip().splitlines()[-1])["cpu_plan"]
    assert KEYS <= set(plan) and plan["threads"]["value"].isdigit()
