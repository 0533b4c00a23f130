"""Counters for GET /metrics: JSON, or the Prometheus text exposition format."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import psutil


class Metrics:
    """Requests, errors, jobs by outcome and the last run's cost (thread-safe: the worker writes too)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self.by_status: Counter[int] = Counter()
        self.jobs: Counter[str] = Counter()  # "t2i:done", "chat:cancelled", ...
        self.events: Counter[str] = Counter()  # "disconnects"
        self.last_job: dict[str, Any] | None = None  # the stats of the last job that finished its run
        self.caches: dict[str, Any] = {}  # the pipeline's caches after the last run (RuntimeCaches.stats())
        self._process = psutil.Process()

    def request(self, path: str, status: int) -> None:
        with self._lock:
            self.requests += 1
            self.by_status[status] += 1
            if status >= 400:
                self.errors += 1

    def count(self, name: str) -> None:
        with self._lock:
            self.events[name] += 1

    def job_finished(self, task: str, state: str, stats: dict[str, Any] | None) -> None:
        """Count a finished job; `stats` is its result's stats (`tasks.run_stats`) when it finished."""
        keys = ("task", "seconds", "steps", "nfe", "images", "nfe_total", "width", "height", "peak_device_bytes",
                "peak_rss_bytes")
        with self._lock:
            self.jobs[f"{task}:{state}"] += 1
            if stats:
                self.last_job = {key: stats.get(key) for key in keys}
                self.caches = dict(stats.get("cache") or {})

    def snapshot(self, queue_length: int, running: bool, uptime: float) -> dict[str, Any]:
        with self._lock:
            return {"queue_length": queue_length, "running": int(running), "requests_total": self.requests,
                    "errors_total": self.errors, "responses_by_status": {str(k): v for k, v in sorted(self.by_status.items())},
                    "jobs_total": dict(self.jobs), "disconnects_total": self.events["disconnects"],
                    "last_run": self.last_job, "caches": self.caches, "rss_bytes": self._process.memory_info().rss,
                    "uptime_seconds": round(uptime, 3)}

    @staticmethod
    def prometheus(snap: dict[str, Any]) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, Any]]) -> None:
            lines.append(f"# HELP ovis_lite_{name} {help_text}")
            lines.append(f"# TYPE ovis_lite_{name} {kind}")
            for labels, value in samples:
                lines.append(f"ovis_lite_{name}{labels} {value}")

        metric("queue_length", "gauge", "Jobs waiting for the device.", [("", snap["queue_length"])])
        metric("running", "gauge", "1 while a job runs on the device.", [("", snap["running"])])
        metric("requests_total", "counter", "HTTP requests answered.", [("", snap["requests_total"])])
        metric("errors_total", "counter", "HTTP responses with status >= 400.", [("", snap["errors_total"])])
        metric("responses_total", "counter", "HTTP responses by status.",
               [(f'{{status="{k}"}}', v) for k, v in snap["responses_by_status"].items()])
        jobs = []
        for key, value in sorted(snap["jobs_total"].items()):
            task, state = key.split(":")
            jobs.append((f'{{task="{task}",state="{state}"}}', value))
        metric("jobs_total", "counter", "Jobs finished, by task and outcome.", jobs)
        metric("disconnects_total", "counter", "Jobs cancelled because their client went away.",
               [("", snap["disconnects_total"])])
        last = snap["last_run"] or {}
        metric("last_run_seconds", "gauge", "Wall time of the last finished run.", [("", last.get("seconds", 0.0))])
        metric("last_run_steps", "gauge", "Solver steps per image of the last run.", [("", last.get("steps") or 0)])
        metric("last_run_nfe", "gauge", "Model evaluations per image of the last run.", [("", last.get("nfe") or 0)])
        metric("last_run_peak_device_bytes", "gauge", "Peak device memory of the last run (0 on CPU).",
               [("", last.get("peak_device_bytes") or 0)])
        metric("last_run_peak_rss_bytes", "gauge", "Peak host RSS during the last run.",
               [("", last.get("peak_rss_bytes", 0))])
        caches = [(name, c) for name, c in (snap.get("caches") or {}).items() if isinstance(c, dict)]
        for field, kind, help_text in (("hits", "counter", "Cache lookups that found their entry."),
                                       ("misses", "counter", "Cache lookups that computed their entry."),
                                       ("evictions", "counter", "Entries evicted to stay inside the byte budget."),
                                       ("bytes", "gauge", "Bytes the cache holds now."),
                                       ("entries", "gauge", "Entries the cache holds now.")):
            suffix = "_total" if kind == "counter" else ""
            metric(f"cache_{field}{suffix}", kind, help_text + " By cache (vision, prefix_kv, conditions).",
                   [(f'{{cache="{name}"}}', c.get(field, 0)) for name, c in caches])
        metric("rss_bytes", "gauge", "Resident memory of the server process now.", [("", snap["rss_bytes"])])
        metric("uptime_seconds", "gauge", "Seconds since the server started.", [("", snap["uptime_seconds"])])
        return "\n".join(lines) + "\n"
