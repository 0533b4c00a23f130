"""Steps and NFE are defined once (`lite.runtime.results`) and shown the same way by the CLI and the server:
per image, "S steps, NFE N per image"."""

from __future__ import annotations

import json
import re

from lite.runtime.results import RunStats


def test_counts_read_per_image():
    assert RunStats("t2i", steps=8, nfe=16, images=1).counts() == "8 steps, NFE 16 per image"
    assert RunStats("t2i", steps=8, nfe=16, images=2, nfe_total=32).counts() == "8 steps, NFE 16 per image, 2 images"
    assert RunStats("understand", tokens=5).counts() == ""


def test_the_cli_summary_and_json_count_per_image(tiny_dir, tmp_path, capsys):
    """Euler, 3 steps, 2-pass CFG at every step: 3 steps and 2 x 3 = 6 Yak evaluations per image (spec §3.8),
    for each of the two images of `-b 2`, in the summary line and in --json alike."""
    from lite.cli.main import main

    code = main(["generate", "a fox", "-o", str(tmp_path / "fox.png"), "--model", str(tiny_dir), "--device", "cpu",
                 "--preset", "cpu", "--solver", "euler", "--steps", "3", "--width", "32", "--height", "32",
                 "-b", "2", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    results = [json.loads(line) for line in out.splitlines()]
    assert [(r["steps"], r["nfe"]) for r in results] == [(3, 6), (3, 6)]
    summaries = [line for line in err.splitlines() if re.match(r"ovis-lite: t2i 32x32", line)]
    assert len(summaries) == 2 and all(", 3 steps, NFE 6 per image in " in line for line in summaries), err
