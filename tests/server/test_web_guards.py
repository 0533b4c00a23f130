"""No web page can drive the server: the Host check (DNS rebinding) and the Origin / content-type
checks (cross-site writes), against the real server process (issue 25, classes 1 and 2)."""

from __future__ import annotations

import httpx
import pytest

from lite.server.launch import ServerProcess
from lite.server.trust import Trust

from .conftest import EXTRA_HOST, EXTRA_ORIGIN, assert_refused, job_count, png_bytes

CHAT = {"model": "Ovis-U1-3B", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


def port_of(server: ServerProcess) -> int:
    return int(server.url.rsplit(":", 1)[1])


@pytest.mark.parametrize("host", ["evil.example", "127.0.0.1.evil.example", "localhost.evil.example",
                                  "my-box.lan.evil.example", "evil.example:1", ""])
def test_a_foreign_host_is_refused_on_every_route(http: httpx.Client, guarded_server: ServerProcess,
                                                  host: str) -> None:
    before = job_count(http)
    hdr = {"Host": f"{host}:{port_of(guarded_server)}" if host and ":" not in host else host}
    for method, path, kwargs in [("GET", "/v1/jobs", {}), ("GET", "/health", {}), ("GET", "/", {}),
                                 ("POST", "/v1/chat/completions", {"json": CHAT}),
                                 ("POST", "/v1/jobs", {"json": {"task": "generate", "prompt": "x"}}),
                                 ("GET", "/v1/jobs/job_x/events", {}), ("DELETE", "/v1/jobs/job_x", {}),
                                 ("GET", "/metrics", {})]:
        r = http.request(method, path, headers=hdr, **kwargs)
        err = assert_refused(r, 403, code="host_not_allowed")
        assert "--allowed-host" in err["message"]
        assert "prompt" not in r.text  # nothing of the jobs is read back
    assert job_count(http) == before  # nothing was queued


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST", "127.0.0.2", "[::1]", "app.localhost",
                                  EXTRA_HOST, "MY-BOX.LAN"])
def test_loopback_names_and_allowed_hosts_are_served(http: httpx.Client, guarded_server: ServerProcess,
                                                     host: str) -> None:
    r = http.get("/v1/jobs", headers={"Host": f"{host}:{port_of(guarded_server)}"})
    assert r.status_code == 200, r.text
    assert http.get("/health", headers={"Host": host}).status_code == 200  # no port: still this server's name


def test_host_rules_for_a_network_bind() -> None:
    """On a non-loopback bind (which takes an API key) IP literals pass (they cannot be rebound), names
    need --allowed-host; '*' turns the check off."""
    lan = Trust.for_bind("0.0.0.0", ["nas.home", "*.corp.example"])
    assert lan.host_allowed("192.168.1.20:8000") and lan.host_allowed("[fe80::1]:8000")
    assert lan.host_allowed("nas.home") and lan.host_allowed("a.corp.example:8000")
    assert not lan.host_allowed("evil.example:8000") and not lan.host_allowed("corp.example.evil:8000")
    loop = Trust.for_bind("127.0.0.1")
    assert not loop.host_allowed("192.168.1.20:8000")  # loopback bind: only loopback and the bound address
    assert Trust.for_bind("127.0.0.1", ["*"]).host_allowed("anything.example")
    assert loop.host_allowed(None)  # no Host header at all: HTTP/1.0 tools, never a browser


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1.evil.example",
                                    "https://localhost:3000", "http://localhost:3001", "file://", "garbage"])
def test_a_foreign_origin_cannot_write(http: httpx.Client, origin: str) -> None:
    before = job_count(http)
    simple = {"Origin": origin, "Content-Type": "text/plain"}  # what a page may send without a preflight
    assert_refused(http.post("/v1/chat/completions", content=b'{"messages":[{"role":"user","content":"Hi"}]}',
                             headers=simple), 403, code="origin_not_allowed")
    assert_refused(http.post("/v1/jobs", json={"task": "generate", "prompt": "x"}, headers={"Origin": origin}),
                   403, code="origin_not_allowed")
    r = http.post("/v1/images/edits", headers={"Origin": origin}, data={"prompt": "add a hat"},
                  files={"image": ("a.png", png_bytes(), "image/png")})
    assert_refused(r, 403, code="origin_not_allowed")
    assert_refused(http.get("/v1/jobs", headers={"Origin": origin}), 403)  # nor read
    assert job_count(http) == before


def test_json_routes_take_json_only(http: httpx.Client) -> None:
    before = job_count(http)
    body = b'{"messages":[{"role":"user","content":"Hi"}],"max_tokens":1}'
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": kind} if kind else {}
        for path in ("/v1/chat/completions", "/v1/images/generations", "/v1/jobs"):
            err = assert_refused(http.post(path, content=body, headers=headers), 415, code="unsupported_media_type")
            assert "application/json" in err["message"]
    assert_refused(http.post("/v1/images/edits", json={"prompt": "x"}), 415)  # edits: multipart only
    assert job_count(http) == before
    ok = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_the_own_origin_and_cors_origins_are_served(http: httpx.Client, guarded_server: ServerProcess) -> None:
    own = http.post("/v1/chat/completions", json=CHAT, headers={"Origin": guarded_server.url})
    assert own.status_code == 200 and "access-control-allow-origin" not in own.headers  # same origin: no CORS
    pre = http.options("/v1/chat/completions", headers={"Origin": EXTRA_ORIGIN, "Access-Control-Request-Method": "POST",
                                                        "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == EXTRA_ORIGIN
    assert "content-type" in pre.headers["access-control-allow-headers"].lower()
    r = http.post("/v1/chat/completions", json=CHAT, headers={"Origin": EXTRA_ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == EXTRA_ORIGIN
    bad_pre = http.options("/v1/jobs", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert bad_pre.status_code == 403 and "access-control-allow-origin" not in bad_pre.headers
