"""Server overhead per request: `ovis-lite serve` over HTTP against the same task through the Python API.

Two ratios, both medians of interleaved repeats:

- `http / api`: wall time of a POST /v1/images/generations (or /v1/chat/completions) against the same
  `pipe.generate` (or `pipe.understand`) call in this process, on the same checkpoint and preset
  (interleaved: api, http, api, http, ...). Needs the model twice in memory (this process and the server).
- `http / in-server run`: the same HTTP wall time against the pipeline's own RunStats.seconds for that
  request, measured inside the server. One copy of the model; what `--server-only` measures (full size).

    python scripts/bench_serve.py                       # a tiny random checkpoint, 64x64, 2 steps
    python scripts/bench_serve.py --model /tmp/ovis-lite-full --size 256 --steps 2 --server-only
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from lite.server.launch import ServerProcess  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cpuname, also when imported by a test
from cpuname import cpu_name  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint directory (default: a fresh tiny random checkpoint)")
    ap.add_argument("--preset", default=None, help="preset (default: the one chosen for this machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=64, help="image side in px (default 64)")
    ap.add_argument("--steps", type=int, default=2, help="denoising steps (default 2)")
    ap.add_argument("--tokens", type=int, default=16, help="max_tokens of the chat request (default 16)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--server-only", action="store_true", help="do not load the model in this process too")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    tmp = None
    model = args.model
    if model is None:
        from lite.model.tiny import make_tiny

        tmp = tempfile.TemporaryDirectory()
        model = str(Path(tmp.name) / "tiny")
        make_tiny(model, seed=0)
    extra = ["--preset", args.preset] if args.preset else []
    gen_body = {"prompt": "a red fox in the snow", "size": f"{args.size}x{args.size}", "steps": args.steps, "seed": 1}
    buf = io.BytesIO()
    Image.new("RGB", (args.size, args.size), (200, 40, 40)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    chat_body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                           {"type": "text", "text": "What is it?"}]}],
                 "max_tokens": args.tokens}

    with ServerProcess("--model", model, "--device", args.device, *extra, timeout=1800) as srv, \
            httpx.Client(base_url=srv.url, timeout=httpx.Timeout(3600.0)) as client:
        preset = client.get("/health").json()["preset"]
        pipe = None
        if not args.server_only:
            from lite import OvisPipeline
            from lite.cli.runconfig import configure_threads

            configure_threads(None)  # the server's own thread setting (physical cores), for a like-for-like call
            pipe = OvisPipeline.from_pretrained(model, device=args.device, preset=preset, progress=False)
        image = Image.open(buf)

        # The API calls run on one worker thread, as the server's do: on a loaded machine torch's
        # OpenMP work from the main thread was measured up to 10x slower (docs/server.md).
        worker = ThreadPoolExecutor(1)

        def timed(fn) -> float:
            def call() -> float:
                t = time.perf_counter()
                fn()
                return time.perf_counter() - t
            return worker.submit(call).result()

        def api_gen() -> float:
            return timed(lambda: pipe.generate(gen_body["prompt"], width=args.size, height=args.size,
                                               steps=args.steps, seed=1))

        def api_chat() -> float:
            return timed(lambda: pipe.understand([image], "What is it?", max_new_tokens=args.tokens))

        def http(path: str, body: dict) -> tuple[float, float]:
            t = time.perf_counter()
            r = client.post(path, json=body)
            wall = time.perf_counter() - t
            r.raise_for_status()
            return wall, r.json()["ovis_lite"]["stats"]["seconds"]

        results = {}
        for name, path, body, api in (("t2i", "/v1/images/generations", gen_body, api_gen),
                                      ("chat", "/v1/chat/completions", chat_body, api_chat)):
            try:
                http(path, body)  # warm-up, both sides
            except httpx.HTTPStatusError as exc:  # e.g. a checkpoint whose tokenizer cannot decode its output
                results[name] = {"error": exc.response.text[:300]}
                continue
            if pipe is not None:
                api()
            api_s, http_s, inner_s = [], [], []
            for _ in range(args.repeats):
                if pipe is not None:
                    api_s.append(api())
                wall, inner = http(path, body)
                http_s.append(wall)
                inner_s.append(inner)
            row = {"http_s": statistics.median(http_s), "in_server_run_s": statistics.median(inner_s),
                   "http_over_in_server_run": statistics.median(w / i for w, i in zip(http_s, inner_s))}
            if api_s:
                row["api_s"] = statistics.median(api_s)
                row["http_over_api"] = statistics.median(h / a for h, a in zip(http_s, api_s))
            results[name] = row

    import torch

    report = {"machine": f"{cpu_name()}, {__import__('os').cpu_count()} logical CPUs", "device": args.device,
              "torch_threads": torch.get_num_threads(),
              "model": "tiny random" if args.model is None else model, "preset": preset,
              "size": args.size, "steps": args.steps, "chat_max_tokens": args.tokens, "repeats": args.repeats,
              "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['machine']}; {report['model']} ({preset}), {args.size}x{args.size}, {args.steps} steps")
        for name, row in results.items():
            if "error" in row:
                print(f"  {name}: failed: {row['error']}")
                continue
            api = f"api {row['api_s'] * 1000:.1f} ms, http/api {row['http_over_api']:.3f}x; " if "api_s" in row else ""
            print(f"  {name}: http {row['http_s'] * 1000:.1f} ms; {api}in-server run {row['in_server_run_s'] * 1000:.1f} ms, "
                  f"http/run {row['http_over_in_server_run']:.3f}x")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
