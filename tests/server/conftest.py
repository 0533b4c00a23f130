"""One real `serve` process on the tiny model for the server tests, and small request helpers.

The server trusts one extra name (`--allowed-host my-box.lan`) and one extra web origin
(`--cors-origin http://localhost:3000`), so the Host and Origin rules can be tested both ways.
"""

from __future__ import annotations

import base64
import io
import zlib
from pathlib import Path

import httpx
import pytest
from PIL import Image

from lite.server.launch import ServerProcess, shared_server

EXTRA_HOST = "my-box.lan"
EXTRA_ORIGIN = "http://localhost:3000"


@pytest.fixture(scope="session")
def guarded_server(tiny_dir: Path) -> ServerProcess:
    return shared_server("--model", str(tiny_dir), "--device", "cpu", "--max-queue", "8", "--max-body-mb", "4",
                         "--max-steps", "1000", "--threads", "1", "--allowed-host", EXTRA_HOST, "--cors-origin", EXTRA_ORIGIN)


@pytest.fixture(scope="session")
def http(guarded_server: ServerProcess):
    with httpx.Client(base_url=guarded_server.url, timeout=httpx.Timeout(60.0)) as client:
        yield client


def png_bytes(size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but that holds no pixel data (a decompression bomb's
    first bytes): refusing it must not need its pixels."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (len(payload).to_bytes(4, "big") + kind + payload
                + zlib.crc32(kind + payload).to_bytes(4, "big"))
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def job_count(client: httpx.Client) -> int:
    return len(client.get("/v1/jobs").json()["data"])


def assert_refused(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    """A 4xx with an OpenAI-style error body (and never a traceback)."""
    assert r.status_code == status, (r.status_code, r.text[:400])
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    assert "Traceback" not in r.text
    return err
