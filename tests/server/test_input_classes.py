"""Inputs that used to reach a 500 (issue 25, class 5): a literal <image> in any prompt field, lone
surrogates, JSON nested 100,000 deep, 5,000-digit integers, wrong types in /v1/jobs. Each is a 4xx with
an OpenAI-style body or a success, and no bad request leaves state that breaks another route."""

from __future__ import annotations

import json

import httpx
import pytest

from .conftest import assert_refused, data_uri, png_bytes

TAG = "<image>"


def raw_post(http: httpx.Client, path: str, text: str) -> httpx.Response:
    """POST a JSON body written by hand (json.dumps cannot write a lone surrogate escape on purpose)."""
    return http.post(path, content=text.encode(), headers={"Content-Type": "application/json"})


def assert_still_serving(http: httpx.Client) -> None:
    jobs = http.get("/v1/jobs")
    assert jobs.status_code == 200 and isinstance(jobs.json()["data"], list), jobs.text[:300]
    assert http.get("/health").json()["status"] == "ok"


def test_a_literal_image_tag_is_text_everywhere(http: httpx.Client) -> None:
    uri = data_uri(png_bytes())
    with_image = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": f"what is {TAG}{TAG}?"}]
    for messages in ([{"role": "user", "content": TAG}],
                     [{"role": "user", "content": with_image}],
                     [{"role": "user", "content": f"{TAG} hi"}, {"role": "assistant", "content": f"{TAG} yes"},
                      {"role": "user", "content": with_image}],
                     [{"role": "system", "content": TAG}, {"role": "user", "content": f"Image 1: {TAG}\n"}]):
        r = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
        assert r.status_code == 200, r.text
    gen = {"prompt": f"a {TAG} sign", "negative_prompt": TAG * 3, "size": "32x32", "steps": 1}
    assert http.post("/v1/images/generations", json=gen).status_code == 200
    edit = http.post("/v1/images/edits", data={"prompt": TAG, "negative_prompt": TAG, "steps": "1"},
                     files={"image": ("a.png", png_bytes(), "image/png")})
    assert edit.status_code == 200, edit.text
    job = http.post("/v1/jobs", json={"task": "generate", "prompt": TAG, "size": "32x32", "steps": 1})
    assert job.status_code == 202
    assert_still_serving(http)


@pytest.mark.parametrize("body", [
    '{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
    '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
    '{"messages": [{"role": "user", "content": "hi"}], "model": "\\ud83d"}',
    '{"messages": [{"role": "user", "content": "hi", "\\ud800": 1}]}',
])
def test_lone_surrogates_in_chat(http: httpx.Client, body: str) -> None:
    err = assert_refused(raw_post(http, "/v1/chat/completions", body), 400)
    assert "surrogate" in err["message"]
    assert_still_serving(http)


@pytest.mark.parametrize("path,body", [
    ("/v1/images/generations", '{"prompt": "a \\ud800 fox"}'),
    ("/v1/images/generations", '{"prompt": "fox", "negative_prompt": "\\udc80"}'),
    ("/v1/jobs", '{"task": "generate", "prompt": "\\ud800", "size": "32x32", "steps": 1}'),
    ("/v1/jobs", '{"task": "generate", "prompt": "fox", "negative_prompt": "x\\udbff", "steps": 1}'),
    ("/v1/jobs", '{"task": "\\ud800", "prompt": "fox"}'),
])
def test_lone_surrogates_never_reach_a_job(http: httpx.Client, path: str, body: str) -> None:
    assert "surrogate" in assert_refused(raw_post(http, path, body), 400)["message"]
    assert_still_serving(http)  # GET /v1/jobs lists every job: none of them holds the bad text


def test_a_valid_pair_is_fine(http: httpx.Client) -> None:
    r = raw_post(http, "/v1/jobs", '{"task": "generate", "prompt": "a fox \\ud83e\\udd8a", "size": "32x32", "steps": 1}')
    assert r.status_code == 202 and r.json()["settings"]["prompt"] == "a fox \U0001f98a"
    assert_still_serving(http)


def test_deep_json_and_huge_numbers(http: httpx.Client) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    for path in ("/v1/chat/completions", "/v1/images/generations", "/v1/jobs"):
        assert "deep" in assert_refused(raw_post(http, path, '{"messages": ' + deep + "}"), 400)["message"]
        assert_refused(raw_post(http, path, deep), 400)
    nested = '{"prompt": "x", "extra": ' + '{"a": ' * 100 + "1" + "}" * 100 + "}"
    assert "nests deeper" in assert_refused(raw_post(http, "/v1/images/generations", nested), 400)["message"]
    digits = "9" * 5000
    for field in ("steps", "seed", "n", "txt_cfg"):
        assert_refused(raw_post(http, "/v1/images/generations", f'{{"prompt": "x", "{field}": {digits}}}'), 400)
    for field in ("max_tokens", "seed", "temperature", "top_p"):
        body = f'{{"messages": [{{"role": "user", "content": "hi"}}], "{field}": -{digits}}}'
        assert_refused(raw_post(http, "/v1/chat/completions", body), 400)
    long = "9" * 4000  # under Python's digit limit: parsed, then compared exactly (no float overflow)
    for field in ("seed", "steps", "txt_cfg", "n"):
        err = assert_refused(raw_post(http, "/v1/images/generations", f'{{"prompt": "x", "{field}": {long}}}'), 400,
                             field)
        assert len(err["message"]) < 200
    for text in ("1e400", "NaN", "-Infinity"):
        assert_refused(raw_post(http, "/v1/images/generations", f'{{"prompt": "x", "txt_cfg": {text}}}'), 400,
                       "txt_cfg")
    assert_refused(http.post("/v1/images/generations", json={"prompt": "x", "size": "9" * 5000 + "x64"}), 400, "size")
    assert_still_serving(http)


@pytest.mark.parametrize("field,value", [
    ("task", ["generate"]), ("task", {"a": 1}), ("task", 3), ("task", None), ("task", True),
    ("prompt", ["x"]), ("prompt", {"x": 1}), ("prompt", 5), ("negative_prompt", []),
    ("size", 64), ("size", ["64x64"]), ("steps", "many"), ("steps", [1]), ("steps", 1.5), ("seed", {"s": 1}),
    ("n", True), ("solver", {}), ("spacing", ["linear"]), ("preview", "yes"), ("image", 123),
    ("image", ["data:image/png;base64,AAAA"]), ("txt_cfg", "high"), ("response_format", {"b64_json": 1}),
])
def test_wrong_types_in_job_fields(http: httpx.Client, field: str, value: object) -> None:
    body = {"task": "edit" if field == "image" else "generate", "prompt": "x", "size": "32x32", "steps": 1}
    body[field] = value
    assert_refused(http.post("/v1/jobs", content=json.dumps(body), headers={"Content-Type": "application/json"}), 400)
    assert_still_serving(http)
