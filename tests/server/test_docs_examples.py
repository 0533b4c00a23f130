"""The curl examples of docs/server.md, run as written (but for the port) against the real server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lite.server.launch import REPO, ServerProcess

from .conftest import png_bytes

DOC = REPO / "docs" / "server.md"


def curl_examples() -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Examples with curl", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "docs/server.md lost its curl examples"
    joined = block.group(1).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("curl ")]


def test_the_docs_have_examples_for_every_post_route() -> None:
    commands = " ".join(curl_examples())
    for route in ("/health", "/v1/chat/completions", "/v1/images/generations", "/v1/images/edits", "/v1/jobs"):
        assert route in commands


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_examples_work(guarded_server: ServerProcess, tmp_path: Path) -> None:
    (tmp_path / "photo.png").write_bytes(png_bytes((48, 32)))
    for command in curl_examples():
        assert "http://127.0.0.1:8000" in command
        run = command.replace("http://127.0.0.1:8000", guarded_server.url) + " -w '\\n%{http_code}'"
        r = subprocess.run(["bash", "-c", run], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (command, r.stderr)
        body, status = r.stdout.rsplit("\n", 1)
        assert status in ("200", "202"), (command, status, body[:300])
        answer = json.loads(body)
        assert "error" not in answer, (command, answer)
