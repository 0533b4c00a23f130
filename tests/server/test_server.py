"""`ovis-lite serve`: the real server process on a free loopback port, talked to over HTTP.

One server (tiny checkpoint, CPU) serves the whole module; results are checked against the same
calls through the Python API in this process, and the OpenAI wire formats against their spec.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from lite.server.launch import REPO, ServerProcess

TIMEOUT = httpx.Timeout(60.0)


@pytest.fixture(scope="module")
def server(tiny_dir: Path):
    with ServerProcess("--model", str(tiny_dir), "--device", "cpu", "--max-body-mb", "1",
                       "--max-steps", "1000", "--max-queue", "8") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerProcess):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def pipe(tiny_dir: Path):
    """The same checkpoint and preset through the Python API: the independent reference."""
    from lite import OvisPipeline

    return OvisPipeline.from_pretrained(tiny_dir, device="cpu", preset="cpu", progress=False)


def png_data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def sample_image(seed: int = 0, size: tuple[int, int] = (64, 64)) -> Image.Image:
    import numpy as np

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    assert "Traceback" not in r.text
    return err


# ---------------------------------------------------------------------------------------------

def test_refuses_public_host_without_key_before_loading(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"  # never reached: the refusal comes first
    r = subprocess.run([sys.executable, "-m", "lite.server", "--host", "0.0.0.0", "--model", str(missing)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ovis-lite: error: --host 0.0.0.0") and "--api-key" in lines[0]
    assert "no-such-checkpoint" not in r.stderr


def test_page_health_models_metrics(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script" in page.text and "http://" not in page.text and "https://" not in page.text  # no CDN
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["preset"] == "cpu" and health["defaults"]["steps"] == 8
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == health["model"]
    assert client.get(f"/v1/models/{health['model']}").json()["object"] == "model"
    metrics = client.get("/metrics").json()
    for key in ("queue_length", "requests_total", "errors_total", "last_run", "rss_bytes"):
        assert key in metrics
    for prom in (client.get("/metrics?format=prometheus"), client.get("/metrics", headers={"Accept": "text/plain"})):
        assert prom.headers["content-type"].startswith("text/plain")
        values = dict(line.rsplit(" ", 1) for line in prom.text.splitlines() if line and not line.startswith("#"))
        assert {"ovis_lite_queue_length", "ovis_lite_requests_total", "ovis_lite_errors_total",
                "ovis_lite_last_run_seconds", "ovis_lite_last_run_nfe", "ovis_lite_last_run_peak_rss_bytes"} <= set(values)
        assert all(float(v) >= 0 for v in values.values())


def test_generation_matches_python_api_and_carries_cli_metadata(client: httpx.Client, pipe, tmp_path: Path) -> None:
    from lite.runtime.metadata import read_metadata

    r = client.post("/v1/images/generations", json={"prompt": "a red fox", "size": "64x64", "n": 2, "steps": 2,
                                                    "seed": 7, "negative_prompt": "blurry", "txt_cfg": 4.0,
                                                    "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["seed"] for d in body["data"]] == [7, 8]
    expected = pipe.generate("a red fox", width=64, height=64, steps=2, seed=7, txt_cfg=4.0,
                             negative_prompt="blurry", num_images=2)
    for item, ref in zip(body["data"], expected.images):
        png = base64.b64decode(item["b64_json"])
        img = Image.open(io.BytesIO(png))
        assert img.size == (64, 64)
        assert img.convert("RGB").tobytes() == ref.tobytes()  # the same pixels as the Python API
        path = tmp_path / f"{item['seed']}.png"
        path.write_bytes(png)
        meta = read_metadata(path)  # the CLI's reader understands it
        assert meta["task"] == "t2i" and meta["seed"] == item["seed"] and meta["steps"] == 2
        assert meta["negative_prompt"] == "blurry" and meta["preset"] == "cpu" and meta["txt_cfg"] == 4.0
        assert meta["width"] == 64 and meta["nfe"] == expected.stats.nfe
    stats = body["ovis_lite"]["stats"]
    assert stats["nfe"] == expected.stats.nfe and stats["steps"] == 2 and stats["images"] == 2  # per image, as the CLI
    assert stats["nfe_total"] == 2 * expected.stats.nfe
    last = client.get("/metrics").json()["last_run"]
    assert last["task"] == "t2i" and last["nfe"] == expected.stats.nfe and last["seconds"] > 0


def test_edit_multipart(client: httpx.Client, pipe) -> None:
    src = sample_image(1)
    buf = io.BytesIO()
    src.save(buf, format="PNG")
    r = client.post("/v1/images/edits", files={"image": ("in.png", buf.getvalue(), "image/png")},
                    data={"prompt": "add a hat", "steps": "2", "seed": "3"})
    assert r.status_code == 200, r.text
    img = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    ref = pipe.edit(src, "add a hat", steps=2, seed=3).image
    assert img.convert("RGB").tobytes() == ref.tobytes()
    assert json.loads(img.text["ovis-lite"])["task"] == "edit"


def test_chat_multiturn_follows_the_reference_template(client: httpx.Client, pipe) -> None:
    from lite.model.processing import Turn

    a, b = sample_image(2), sample_image(3)
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_uri(a)}},
                                     {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_uri(b)}},
                                     {"type": "text", "text": "Describe each image."}]},
    ]
    r = client.post("/v1/chat/completions", json={"model": "x", "messages": messages, "max_tokens": 12,
                                                  "temperature": 0.8, "top_p": 0.9, "seed": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    expected = pipe.understand([a, b], "Describe each image.", max_new_tokens=12, do_sample=True, temperature=0.8,
                               top_p=0.9, history=[Turn("What is it?", "a cat", 1)], seed=5)
    assert body["choices"][0]["message"]["content"] == expected.text
    assert body["usage"]["completion_tokens"] == expected.stats.tokens
    assert body["choices"][0]["finish_reason"] == ("length" if expected.stats.tokens >= 12 else "stop")


def test_chat_stream_is_openai_chunks(client: httpx.Client) -> None:
    request = {"model": "x", "messages": [{"role": "user", "content": "What is it?"}], "max_tokens": 10,
               "temperature": 1.0, "seed": 1}
    whole = client.post("/v1/chat/completions", json=request).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions",
                       json=request | {"stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert choices[0]["delta"]["role"] == "assistant"
    assert choices[-1]["finish_reason"] in ("stop", "length") and choices[-1]["delta"] == {}
    assert all(ch["finish_reason"] is None for ch in choices[:-1])
    assert "".join(ch["delta"].get("content", "") for ch in choices) == whole
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1


def test_bad_requests_get_4xx_with_an_error_body(client: httpx.Client) -> None:
    gen = "/v1/images/generations"
    assert_error(client.post(gen, content=b"{not json", headers={"Content-Type": "application/json"}), 400)
    assert_error(client.post(gen, json=[1, 2]), 400)
    assert_error(client.post(gen, json={"size": "64x64"}), 400, "prompt")
    assert_error(client.post("/v1/chat/completions", json={"model": "x"}), 400, "messages")
    assert_error(client.post(gen, json={"prompt": "x" * (2 * 2**20)}), 413)
    url = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}},
                                       {"type": "text", "text": "What is it?"}]}
    err = assert_error(client.post("/v1/chat/completions", json={"messages": [url]}), 400,
                       "messages[0].content[0].image_url")
    assert "data URI" in err["message"]
    assert_error(client.post(gen, json={"prompt": "a fox", "n": 1000}), 400, "n")
    assert_error(client.post(gen, json={"prompt": "a fox", "size": "big"}), 400, "size")
    assert_error(client.post(gen, json={"prompt": "a fox", "size": "64x99999"}), 400, "size")
    assert_error(client.post(gen, json={"prompt": "a fox", "response_format": "url"}), 400, "response_format")
    assert_error(client.post(gen, json={"prompt": "a fox", "steps": "many"}), 400, "steps")
    bad_image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                             {"type": "text", "text": "What?"}]}
    assert_error(client.post("/v1/chat/completions", json={"messages": [bad_image]}), 400)
    assert_error(client.post("/v1/images/edits", data={"prompt": "x"}, files={"other": ("a", b"a")}), 400, "image")
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/chat/completions"), 405)
    assert_error(client.get("/v1/jobs/job_missing"), 404, "job_id")
    assert client.get("/health").status_code == 200  # still serving
    assert client.get("/metrics").json()["errors_total"] >= 15


def _post_raw(url: str, path: str, body: dict) -> socket.socket:
    """Send a request and keep the socket open without reading: a client we can drop mid-job."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _wait(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_disconnected_client_is_cancelled_and_does_not_block(client: httpx.Client, server: ServerProcess) -> None:
    before = client.get("/metrics").json()
    sock = _post_raw(server.url, "/v1/images/generations", {"prompt": "long", "size": "128x128", "steps": 1000})
    _wait(lambda: client.get("/metrics").json()["running"] == 1)
    sock.close()  # the client goes away mid-job
    t0 = time.monotonic()
    r = client.post("/v1/images/generations", json={"prompt": "next", "size": "64x64", "steps": 2})
    assert r.status_code == 200
    assert time.monotonic() - t0 < 20  # the 20000-step job (minutes) did not run to its end
    after = client.get("/metrics").json()
    assert after["jobs_total"].get("t2i:cancelled", 0) == before["jobs_total"].get("t2i:cancelled", 0) + 1
    assert after["disconnects_total"] == before["disconnects_total"] + 1


def test_jobs_show_position_progress_and_results(client: httpx.Client) -> None:
    first = client.post("/v1/jobs", json={"task": "generate", "prompt": "a", "size": "64x64", "steps": 200})
    second = client.post("/v1/jobs", json={"task": "generate", "prompt": "b", "size": "64x64", "steps": 3, "seed": 9})
    assert first.status_code == 202 and second.status_code == 202
    a, b = first.json()["id"], second.json()["id"]
    status = client.get(f"/v1/jobs/{b}").json()
    assert status["state"] == "queued" and status["position"] >= 1
    events = []
    with client.stream("GET", f"/v1/jobs/{b}/events") as r:
        for line in r.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
            elif line.startswith("data: ") and events[-1] == "done":
                done = json.loads(line[6:])
    assert events[0] == "status" and events[-1] == "done"
    assert "position" in events and "started" in events and events.count("progress") == 3
    assert done["result"]["data"][0]["seed"] == 9
    assert client.get(f"/v1/jobs/{a}").json()["state"] == "done"  # FIFO: the first finished before the second
    edit = client.post("/v1/jobs", json={"task": "edit", "image": png_data_uri(sample_image(4)), "prompt": "add a hat",
                                         "steps": 2, "preview": False})
    assert edit.status_code == 202, edit.text
    edit_id = edit.json()["id"]
    _wait(lambda: client.get(f"/v1/jobs/{edit_id}").json()["state"] == "done")
    result = client.get(f"/v1/jobs/{edit_id}").json()["result"]["result"]
    assert Image.open(io.BytesIO(base64.b64decode(result["data"][0]["b64_json"]))).size == (64, 64)
    assert_error(client.post("/v1/jobs", json={"task": "edit", "prompt": "x"}), 400, "image")
    assert_error(client.post("/v1/jobs", json={"task": "paint", "prompt": "x"}), 400, "task")
    cancelled = client.post("/v1/jobs", json={"task": "generate", "prompt": "c", "size": "128x128", "steps": 1000})
    job_id = cancelled.json()["id"]
    _wait(lambda: client.get(f"/v1/jobs/{job_id}").json()["state"] == "running")
    client.delete(f"/v1/jobs/{job_id}")
    _wait(lambda: client.get(f"/v1/jobs/{job_id}").json()["state"] == "cancelled", 10)


def test_four_concurrent_requests_in_queue_order(server: ServerProcess, client: httpx.Client) -> None:
    results: dict[int, httpx.Response] = {}

    def post(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
            results[i] = c.post("/v1/images/generations",
                                json={"prompt": f"image {i}", "size": "64x64", "steps": 30, "seed": i})

    threads = []
    for i in range(4):
        threads.append(threading.Thread(target=post, args=(i,)))
        threads[-1].start()
        _wait(lambda: sum(1 for j in client.get("/v1/jobs").json()["data"]
                          if j["settings"].get("prompt") == f"image {i}") == 1)
    for t in threads:
        t.join(60)
    assert all(results[i].status_code == 200 for i in range(4)), [r.text for r in results.values()]
    ext = [results[i].json()["ovis_lite"] for i in range(4)]
    assert [e["seq"] for e in ext] == sorted(e["seq"] for e in ext)  # served in the order they queued
    for prev, cur in zip(ext, ext[1:]):
        assert cur["started_at"] >= prev["finished_at"]  # one job at a time on the device
    assert [results[i].json()["data"][0]["seed"] for i in range(4)] == [0, 1, 2, 3]


def test_memory_is_stable_over_20_requests(server: ServerProcess, client: httpx.Client) -> None:
    import psutil

    proc = psutil.Process(server.pid)
    rss = []
    for i in range(20):
        r = client.post("/v1/images/generations", json={"prompt": f"fox {i}", "size": "64x64", "steps": 1, "seed": i})
        assert r.status_code == 200
        rss.append(proc.memory_info().rss)
    reported = client.get("/metrics").json()["rss_bytes"]
    assert abs(reported - proc.memory_info().rss) < 32 * 2**20  # /metrics reports the server's own RSS
    growth = max(rss[10:]) - rss[4]
    assert growth < 24 * 2**20, [round(x / 2**20) for x in rss]


def test_sigterm_cancels_the_running_job_and_exits(server: ServerProcess, client: httpx.Client) -> None:
    """Last: it stops the module's server."""
    box: dict[str, httpx.Response | Exception] = {}

    def long_request() -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
                box["r"] = c.post("/v1/images/generations", json={"prompt": "long", "size": "128x128", "steps": 1000})
        except Exception as exc:  # noqa: BLE001 - the server may close the connection
            box["r"] = exc

    t = threading.Thread(target=long_request)
    t.start()
    _wait(lambda: client.get("/metrics").json()["running"] == 1)
    t0 = time.monotonic()
    assert server.terminate(timeout=20) == 0
    assert time.monotonic() - t0 < 8
    t.join(10)
    r = box["r"]
    if isinstance(r, httpx.Response):
        assert_error(r, 503)
    assert "Traceback" not in server.stderr, server.stderr


def test_oom_and_bugs_in_a_job_leave_the_server_up(pipe, monkeypatch, capfd) -> None:
    """In-process app on the real tiny pipeline: a device OOM that survived the pipeline's own retry is a
    503, a real bug is a 500 JSON error with its traceback on stderr, and the next request still works."""
    import torch
    from starlette.testclient import TestClient

    from lite.server.app import ServerSettings, create_app

    app = create_app(pipe, ServerSettings(device="cpu"))
    body = {"prompt": "a fox", "size": "64x64", "steps": 1}
    real = pipe.generate
    try:
        with TestClient(app, base_url="http://127.0.0.1") as tc:  # a loopback Host, as a real client sends
            monkeypatch.setattr(pipe, "generate", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
            err = assert_error(tc.post("/v1/images/generations", json=body), 503)
            assert err["code"] == "out_of_memory"
            monkeypatch.setattr(pipe, "generate", lambda *a, **k: (_ for _ in ()).throw(KeyError("bug")))
            r = tc.post("/v1/images/generations", json=body)
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
            assert "Traceback" not in r.text and "KeyError" in capfd.readouterr().err
            monkeypatch.setattr(pipe, "generate", real)
            assert tc.post("/v1/images/generations", json=body).status_code == 200
    finally:
        app.state.server.queue.close()
