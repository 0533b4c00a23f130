"""Limits hold before any work: images are counted and sized (from their headers) before one is
decoded, decoding stays off the event loop, and multipart shapes are refused clearly (issue 25,
classes 3 and 6), against the real server process."""

from __future__ import annotations

import json
import threading
import time

import httpx
import psutil

from lite.server.launch import ServerProcess

from .conftest import assert_refused, data_uri, job_count, png_bytes, png_header_only


def chat_with_images(uris: list[str], question: str = "What is it?") -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in uris] + [{"type": "text", "text": question}]
    return {"model": "Ovis-U1-3B", "messages": [{"role": "user", "content": parts}], "max_tokens": 1}


class HealthProbe:
    """Polls /health on its own connection while a request runs; records each answer's latency."""

    def __init__(self, url: str) -> None:
        self.url, self.latencies, self.failures = url, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5.0) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    ok = c.get("/health").status_code == 200
                except httpx.HTTPError as exc:
                    ok = False
                    self.failures.append(repr(exc))
                self.latencies.append(time.perf_counter() - t0)
                if not ok:
                    self.failures.append("not 200")
                time.sleep(0.02)

    def __enter__(self) -> "HealthProbe":
        self._thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_ten_thousand_tiny_images_are_refused_at_once(http: httpx.Client, guarded_server: ServerProcess) -> None:
    uri = data_uri(png_bytes((1, 1)))
    body = json.dumps(chat_with_images([uri] * 10_000)).encode()
    assert len(body) < 4 * 2**20  # under --max-body-mb: only the image count can refuse it
    rss_before = psutil.Process(guarded_server.pid).memory_info().rss
    with HealthProbe(guarded_server.url) as probe:
        t0 = time.perf_counter()
        r = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        elapsed = time.perf_counter() - t0
        time.sleep(0.2)
    err = assert_refused(r, 400, "messages")
    assert "10000 images" in err["message"] and "at most 8" in err["message"]
    assert elapsed < 0.5, f"refused after {elapsed:.2f} s"
    assert probe.latencies and max(probe.latencies) < 1.0 and not probe.failures, (probe.latencies, probe.failures)
    grown = psutil.Process(guarded_server.pid).memory_info().rss - rss_before
    assert grown < 200 * 2**20, f"the server grew by {grown / 2**20:.0f} MiB"


def test_image_size_comes_from_the_header(http: httpx.Client) -> None:
    """Sizes come from the header: 20 MP and a 60000x60000 (3.6 GP) claim are refused from 57 bytes each."""
    mid = png_header_only(5000, 4000)  # 20 MP: over the server's 16 Mi pixels, under PIL's own ceiling
    err = assert_refused(http.post("/v1/chat/completions", json=chat_with_images([data_uri(mid)])), 400)
    assert "5000x4000 = 20000000 pixels" in err["message"] and "--max-image-pixels" in err["message"]
    bomb = png_header_only(60_000, 60_000)
    t0 = time.perf_counter()
    r = http.post("/v1/chat/completions", json=chat_with_images([data_uri(bomb)]))
    err = assert_refused(r, 400, "messages[0].content[0].image_url")
    assert "3600000000 pixels" in err["message"] and time.perf_counter() - t0 < 2.0
    edit = http.post("/v1/images/edits", data={"prompt": "add a hat"}, files={"image": ("b.png", bomb, "image/png")})
    assert "--max-image-pixels" in assert_refused(edit, 400, "image")["message"]
    job = http.post("/v1/jobs", json={"task": "edit", "prompt": "add a hat", "image": data_uri(bomb)})
    assert "--max-image-pixels" in assert_refused(job, 400, "image")["message"]


def test_every_image_is_sized_before_any_is_decoded(http: httpx.Client) -> None:
    """A good image first, an oversized header second: refused for the second, naming it."""
    uris = [data_uri(png_bytes()), data_uri(png_header_only(9000, 9000))]
    err = assert_refused(http.post("/v1/chat/completions", json=chat_with_images(uris)), 400)
    assert err["param"] == "messages[0].content[1].image_url"


def test_images_are_counted_over_the_whole_conversation(http: httpx.Client) -> None:
    uri = data_uri(png_bytes())
    turn = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}] * 5 + [
        {"type": "text", "text": "and?"}]}
    body = {"messages": [turn, {"role": "assistant", "content": "ok"}, turn], "max_tokens": 1}
    assert "10 images" in assert_refused(http.post("/v1/chat/completions", json=body), 400, "messages")["message"]
    eight = http.post("/v1/chat/completions", json=chat_with_images([uri] * 8))
    assert eight.status_code == 200, eight.text


def test_multipart_mask_and_second_image_are_refused(http: httpx.Client) -> None:
    before = job_count(http)
    img = ("a.png", png_bytes(), "image/png")
    mask = http.post("/v1/images/edits", data={"prompt": "add a hat"}, files={"image": img, "mask": img})
    assert "mask" in assert_refused(mask, 400, "mask")["message"]
    text_mask = http.post("/v1/images/edits", data={"prompt": "add a hat", "mask": "x"}, files={"image": img})
    assert_refused(text_mask, 400, "mask")
    two = http.post("/v1/images/edits", data={"prompt": "add a hat"}, files=[("image", img), ("image", img)])
    assert "2 'image' parts" in assert_refused(two, 400, "image")["message"]
    listed = http.post("/v1/images/edits", data={"prompt": "add a hat"}, files=[("image[]", img), ("image[]", img)])
    assert_refused(listed, 400, "image")
    many = http.post("/v1/images/edits", data={"prompt": "x"}, files=[("image", img)] * 5)
    assert_refused(many, 400)
    other = http.post("/v1/images/edits", data={"prompt": "x"}, files=[("image", img), ("thumb", img)])
    assert_refused(other, 400, "thumb")
    twice = http.post("/v1/images/edits", data={"prompt": ["x", "y"]}, files={"image": img})
    assert_refused(twice, 400, "prompt")
    assert job_count(http) == before
    one = http.post("/v1/images/edits", data={"prompt": "add a hat", "steps": "1"}, files={"image": img})
    assert one.status_code == 200, one.text
