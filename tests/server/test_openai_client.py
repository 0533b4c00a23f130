"""The official `openai` Python client, unmodified, against `ovis-lite serve` (with an API key)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from lite.server.launch import ServerProcess, shared_server

try:
    import openai
except ImportError:  # a test dependency (requirements.txt)
    openai = None
pytestmark = pytest.mark.skipif(openai is None, reason="the openai client is not installed (pip install openai)")

KEY = "test-key-123"


def keyed_server(tiny_dir: Path) -> ServerProcess:
    """The tiny model behind an API key; tests/server/test_browser.py uses the same process."""
    return shared_server("--model", str(tiny_dir), "--device", "cpu", "--api-key", KEY)


@pytest.fixture(scope="module")
def server(tiny_dir: Path) -> ServerProcess:
    return keyed_server(tiny_dir)


@pytest.fixture(scope="module")
def client(server: ServerProcess):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _png(size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


def test_api_key_is_required(server: ServerProcess) -> None:
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(server.url + "/health").status_code == 200  # health and the page stay open


def test_models(client) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["Ovis-U1-3B"]


def test_chat_and_streaming(client) -> None:
    uri = "data:image/png;base64," + base64.b64encode(_png()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                             {"type": "text", "text": "What is it?"}]}]
    done = client.chat.completions.create(model="Ovis-U1-3B", messages=messages, max_tokens=8, temperature=0.7, seed=3)
    answer = done.choices[0].message.content
    assert isinstance(answer, str) and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model="Ovis-U1-3B", messages=messages, max_tokens=8, temperature=0.7,
                                            seed=3, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces) == answer


def test_bad_request_is_an_openai_error(client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="Ovis-U1-3B", prompt="a fox", n=1000)
    assert info.value.body["param"] == "n"


def test_images_generate_and_edit(client) -> None:
    gen = client.images.generate(model="Ovis-U1-3B", prompt="a red fox", size="64x64", n=1,
                                 response_format="b64_json", extra_body={"steps": 2, "seed": 11})
    img = Image.open(io.BytesIO(base64.b64decode(gen.data[0].b64_json)))
    assert img.size == (64, 64) and '"seed": 11' in img.text["ovis-lite"]
    edit = client.images.edit(model="Ovis-U1-3B", image=("in.png", _png(), "image/png"), prompt="add a hat",
                              extra_body={"steps": 2})
    out = Image.open(io.BytesIO(base64.b64decode(edit.data[0].b64_json)))
    assert out.size == (64, 64) and '"task": "edit"' in out.text["ovis-lite"]
