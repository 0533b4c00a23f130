"""Only a job's creator (or an explicit DELETE) can cancel it: a watcher that closes its /events stream
cancels nothing (issue 25, class 4), against the real server process."""

from __future__ import annotations

import json
import time

import httpx

from .conftest import assert_refused

LONG = {"task": "generate", "prompt": "a long job", "size": "128x128", "steps": 1000, "preview": False}


def watch_until_progress(http: httpx.Client, job_id: str, query: str = "") -> int:
    """Open the events stream, read until a progress event, then close it (the client goes away)."""
    with http.stream("GET", f"/v1/jobs/{job_id}/events{query}") as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if event.get("type") == "progress":
                    return event["step"]
    raise AssertionError("the stream ended without progress")


def state_after(http: httpx.Client, job_id: str, wait: float = 1.0) -> dict:
    time.sleep(wait)
    return http.get(f"/v1/jobs/{job_id}").json()


def test_watchers_cannot_cancel_and_the_owner_can(http: httpx.Client) -> None:
    created = http.post("/v1/jobs", json=LONG)
    assert created.status_code == 202
    job = created.json()
    assert job["owner_token"] and "owner_token" not in http.get(f"/v1/jobs/{job['id']}").text  # shown once
    assert all("owner_token" not in j for j in http.get("/v1/jobs").json()["data"])
    try:
        step = watch_until_progress(http, job["id"])  # a watcher comes and goes
        step = max(step, watch_until_progress(http, job["id"], "?owner=wrong-token"))  # a guess is a watcher too
        status = state_after(http, job["id"])
        assert status["state"] == "running" and status["step"] > step, status
        watch_until_progress(http, job["id"], f"?owner={job['owner_token']}")  # the creator goes away
        for _ in range(40):
            status = state_after(http, job["id"], 0.25)
            if status["state"] != "running":
                break
        assert status["state"] == "cancelled", status
    finally:
        http.delete(f"/v1/jobs/{job['id']}")


def test_an_explicit_delete_cancels(http: httpx.Client) -> None:
    job = http.post("/v1/jobs", json=LONG).json()
    watch_until_progress(http, job["id"])
    assert http.delete(f"/v1/jobs/{job['id']}").status_code == 200
    for _ in range(40):
        status = state_after(http, job["id"], 0.25)
        if status["state"] != "running":
            break
    assert status["state"] == "cancelled"
    assert_refused(http.get("/v1/jobs/job_nope/events"), 404, "job_id")
