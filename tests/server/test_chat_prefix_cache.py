"""A conversation resent in full by the official `openai` client reuses the KV the previous request left."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from lite.server.launch import ServerProcess, shared_server

try:
    import openai
except ImportError:  # a test dependency (requirements.txt)
    openai = None
pytestmark = pytest.mark.skipif(openai is None, reason="the openai client is not installed (pip install openai)")


@pytest.fixture(scope="module")
def client(tiny_dir: Path):
    server: ServerProcess = shared_server("--model", str(tiny_dir), "--device", "cpu")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _image_uri() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 90, 160)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_three_turns_resending_history_reuse_the_prefix(client) -> None:
    messages: list[dict] = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _image_uri()}},
                                                         {"type": "text", "text": "What is it?"}]}]
    reused, prefilled = [], []
    for follow_up in ("Why?", "And then?", None):
        done = client.chat.completions.create(model="Ovis-U1-3B", messages=messages, max_tokens=6, temperature=0)
        cache = done.model_extra["ovis_lite"]["stats"]["cache"]
        reused.append(cache["prefix_tokens_reused"])
        prefilled.append(cache["prefill_tokens"])
        if follow_up is not None:
            messages += [{"role": "assistant", "content": done.choices[0].message.content},
                         {"role": "user", "content": follow_up}]
    # the first request computes everything; the next ones only what is new since the previous answer
    assert reused[0] == 0
    assert reused[1] > prefilled[0] // 2 and reused[2] > reused[1]
    assert prefilled[1] < prefilled[0] and prefilled[2] < prefilled[0]
