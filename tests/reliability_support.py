"""Helpers of the reliability tests: run the real CLI in a subprocess and read what a user would see."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable
from pathlib import Path



@dataclass
class CliResult:
    rc: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        """What a user sees on stderr, line by line."""
        return self.stderr.splitlines()

    def assert_one_line_error(self, *fragments: str) -> str:
        """Exit code 2, exactly one stderr line `ovis-lite: error: ...` with `fragments`, no traceback."""
        assert "Traceback" not in self.stderr, self.stderr
        assert self.rc == 2, (self.rc, self.stderr)
        assert len(self.lines) == 1, self.stderr
        line = self.lines[0]
        assert line.startswith("ovis-lite: error: "), line
        for fragment in fragments:
            assert fragment in line, (fragment, line)
        return line


def run_cli(*args: str | os.PathLike[str], cwd: Path | None = None, timeout: float = 120) -> CliResult:
    """`python -m lite ARGS` in a fresh process, as a user types it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OVIS_LITE_MODEL="")
    proc = subprocess.run([sys.executable, "-m", "lite", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def tree_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (to prove nothing the user owns changed)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else b"<link>")
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def run_as_nobody(fn: Callable[[], object]) -> str:
    """Run `fn` as uid/gid 65534 in a forked child (root reads mode-000 files) and return the message of the
    user error it raised ("" when it raised none); anything else fails the test with its type and text."""
    from offload.errors import UserError

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        code = 0
        try:
            os.setgid(65534)
            os.setuid(65534)
            fn()
            message = ""
        except UserError as exc:
            message = str(exc)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            message, code = f"{type(exc).__name__}: {exc}", 1
        os.write(write, message.encode())
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return out
