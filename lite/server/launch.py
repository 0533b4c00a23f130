"""Start a real `serve` process on a free loopback port and wait until it answers (tests, benchmarks)."""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
_SHARED: dict[tuple[str, ...], "ServerProcess"] = {}


class ServerProcess:
    """`python -m lite.server serve --port 0 ...` as a context manager; `.url` once it is healthy."""

    def __init__(self, *args: str, timeout: float = 120.0, env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.timeout = timeout
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_VERBOSITY": "error", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.stderr_lines: list[str] = []

    def start(self) -> "ServerProcess":
        cmd = [sys.executable, "-m", "lite.server", "serve", "--port", "0", "--quiet", *self.args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + self.timeout
        line = self.proc.stdout.readline()  # "ovis-lite: serving ... on http://127.0.0.1:PORT/"
        if "http://" not in line:
            self.stop()
            raise RuntimeError(f"server did not start: {line!r}\n{self.stderr}")
        self.url = line.rsplit("http://", 1)[1].strip().rstrip("/")
        self.url = "http://" + self.url
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server at {self.url} never became healthy\n{self.stderr}")

    def _drain(self) -> None:
        assert self.proc is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def get_json(self, path: str, headers: dict[str, str] | None = None) -> Any:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.terminate(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def shared_server(*args: str) -> ServerProcess:
    """One started server per argument list for the whole process (stopped at exit): test modules
    that need the same server start it once."""
    srv = _SHARED.get(args)
    if srv is None or srv.proc is None or srv.proc.poll() is not None:
        srv = _SHARED[args] = ServerProcess(*args).start()
        atexit.register(srv.stop)
    return srv
