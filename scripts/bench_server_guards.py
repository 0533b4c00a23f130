"""How fast the server refuses what it must refuse, and whether /health stalls meanwhile (issue 25).

A real `serve` process on a seeded tiny checkpoint. Interleaved in one process, medians of --repeats:
a chat request with 10,000 tiny data-URI images (refused by the count, nothing decoded), a request with
one 57-byte PNG header claiming 60000x60000 (refused by the header), a foreign-Host request and a plain
bad request (the baseline: `{}` to /v1/chat/completions). /health is polled on its own connection all
along; its worst latency is reported. Prints one JSON object.

    python scripts/bench_server_guards.py --repeats 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import psutil  # noqa: E402

from lite.model.tiny import make_tiny  # noqa: E402
from lite.server.launch import ServerProcess  # noqa: E402
from tests.server.conftest import data_uri, png_bytes, png_header_only  # noqa: E402
from tests.server.test_limits_first import HealthProbe, chat_with_images  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        make_tiny(ckpt, seed=0)
        with ServerProcess("--model", str(ckpt), "--device", "cpu", "--threads", "1", "--max-body-mb", "4") as srv, \
                httpx.Client(base_url=srv.url, timeout=60) as client:
            port = srv.url.rsplit(":", 1)[1]
            json_headers = {"Content-Type": "application/json"}
            cases = {
                "baseline_400": lambda: client.post("/v1/chat/completions", content=b"{}", headers=json_headers),
                "images_10000": lambda body=json.dumps(chat_with_images([data_uri(png_bytes((1, 1)))] * 10_000)).encode():
                    client.post("/v1/chat/completions", content=body, headers=json_headers),
                "header_60000x60000": lambda body=json.dumps(chat_with_images([data_uri(png_header_only(60000, 60000))])):
                    client.post("/v1/chat/completions", content=body, headers=json_headers),
                "foreign_host": lambda: client.get("/v1/jobs", headers={"Host": f"evil.example:{port}"}),
            }
            times: dict[str, list[float]] = {name: [] for name in cases}
            rss0 = psutil.Process(srv.pid).memory_info().rss
            with HealthProbe(srv.url) as probe:
                for _ in range(args.repeats):
                    for name, send in cases.items():
                        t0 = time.perf_counter()
                        status = send().status_code
                        times[name].append(time.perf_counter() - t0)
                        assert 400 <= status < 500, (name, status)
            rss1 = psutil.Process(srv.pid).memory_info().rss
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(json.dumps({
        "median_ms": {k: round(v * 1000, 1) for k, v in medians.items()},
        "ratio_to_baseline": {k: round(v / medians["baseline_400"], 2) for k, v in medians.items()},
        "health_max_ms": round(max(probe.latencies) * 1000, 1), "health_polls": len(probe.latencies),
        "server_rss_growth_mib": round((rss1 - rss0) / 2**20, 1), "repeats": args.repeats}, indent=1))


if __name__ == "__main__":
    main()
