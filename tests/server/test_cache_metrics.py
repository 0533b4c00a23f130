"""/metrics reports the pipeline's caches after each run: hits, misses, evictions, bytes and entries per cache."""

from __future__ import annotations

from lite.runtime.caches import RuntimeCaches
from lite.server.metrics import Metrics


def test_metrics_carry_each_caches_counts_in_json_and_prometheus() -> None:
    caches = RuntimeCaches(budget_bytes=1000)
    caches.conditions.put("a", "A", 100)
    caches.conditions.get("a")
    caches.conditions.get("b")
    caches.vision.put("v", "V", 30)
    stats = {"task": "t2i", "seconds": 1.0, "nfe": 2, "width": 32, "height": 32, "peak_device_bytes": None,
             "peak_rss_bytes": 5, "cache": {"prefix_tokens_reused": 0, **caches.stats()}}  # tasks.run_stats
    metrics = Metrics()
    metrics.job_finished("t2i", "done", stats)
    snap = metrics.snapshot(queue_length=0, running=False, uptime=1.0)
    assert snap["caches"]["conditions"]["hits"] == 1 and snap["caches"]["conditions"]["bytes"] == 100
    text = Metrics.prometheus(snap)
    assert 'ovis_lite_cache_hits_total{cache="conditions"} 1' in text
    assert 'ovis_lite_cache_misses_total{cache="conditions"} 1' in text
    assert 'ovis_lite_cache_bytes{cache="vision"} 30' in text
    assert 'ovis_lite_cache_entries{cache="prefix_kv"} 0' in text
    assert "prefix_tokens_reused" not in text  # per-run counts are not a cache
