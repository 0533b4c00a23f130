"""A 3-turn chat about one image through the public API: time to first token per turn, with the caches.

The full-size random checkpoint (written with the shared writer if missing), the `cpu` preset, an
896x896 image and `--turns` turns of `--new-tokens` greedy tokens, each turn resending the whole
conversation (`understand(images, question, history=..., stream=True)`), as the chat REPL and OpenAI
clients do. Then the same turns again with every cache off, to check the answers are token-identical
(the tokens are read from the LLM head's logits with a forward hook: independent of the decode loop).

    flock /tmp/ovis-heavy.lock python scripts/bench_chat.py --json
    flock /tmp/ovis-heavy.lock python scripts/bench_chat.py --server --json

`--server` runs the same turns against a real `ovis-lite serve` process through the official `openai` client,
streamed, each request resending the conversation (the image as a PNG data URI in the first user message, the
earlier answers as assistant messages); a turn's ttft is the time from the request to its first content chunk.
The comparison then runs a second server with `--no-cache` and compares the answers' text.

Reports turnN_ttft_s (the pipeline's `ttft` phase: call to first token chosen), followup_ttft_ratio
(turn 2 / turn 1), prefix tokens reused per turn and tokens_identical_without_cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

QUESTIONS = ["Describe this image in detail.", "What colours stand out?", "What could it be used for?"]


def ensure_checkpoint(path: Path, wait_s: float = 1800.0) -> Path:
    """The full-size checkpoint at `path`: written with the shared writer when the folder is absent or empty,
    waited for when another job is writing it (`.complete` appears last)."""
    from lite.model.fullsize import write_fullsize

    if (path / ".complete").exists():
        return path
    if not path.exists() or not any(path.iterdir()):
        return write_fullsize(path)
    deadline = time.monotonic() + wait_s
    while not (path / ".complete").exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} has no .complete after {wait_s:.0f} s; is its writer still running?")
        time.sleep(10)
    return path


def run_turns(pipe, image, new_tokens: int, turns: int) -> list[dict]:
    """Each turn through the public streaming API with the history so far; the chosen tokens read from the head."""
    from lite.model.processing import Turn

    chosen: list[int] = []
    hook = pipe.model.llm.lm_head.register_forward_hook(
        lambda _m, _i, out: chosen.append(int(out[0, -1].float().argmax())))
    history: list = []
    out = []
    try:
        for question in QUESTIONS[:turns]:
            chosen.clear()
            t0 = time.perf_counter()
            first_piece = None
            pieces = []
            stream = pipe.understand([image], question, history=list(history), max_new_tokens=new_tokens,
                                     stream=True)
            for piece in stream:
                if first_piece is None and piece:
                    first_piece = time.perf_counter() - t0
                pieces.append(piece)
            stats = stream.stats
            answer = "".join(pieces)
            print(f"turn {len(history) + 1}: {time.perf_counter() - t0:.1f} s, phases "
                  f"{ {k: round(v, 2) for k, v in stats.phases.items()} }, cache {stats.cache.get('prefix_tokens_reused')}"
                  f" reused / {stats.cache.get('prefill_tokens')} prefilled", file=sys.stderr, flush=True)
            history.append(Turn(question, answer, num_images=0 if history else 1))
            out.append({"ttft_s": stats.phases.get("ttft"), "first_text_s": first_piece,
                        "seconds": time.perf_counter() - t0, "phases": stats.phases, "tokens": stats.tokens,
                        "ids": chosen[:stats.tokens], "prefix_tokens_reused": stats.cache.get("prefix_tokens_reused"),
                        "prefill_tokens": stats.cache.get("prefill_tokens"),
                        "decode_threads": stats.settings.get("decode_threads"),
                        "decode_threads_reason": stats.settings.get("decode_threads_reason")})
    finally:
        hook.remove()
    return out


def png_data_uri(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def server_turns(model: Path, preset: str, threads: int, image, new_tokens: int, turns: int,
                 cache: bool = True, engine: str = "torch") -> list[dict]:
    """The turns through the `openai` client against a fresh `serve` process, streamed; the history resent."""
    from openai import OpenAI

    from lite.server.launch import ServerProcess

    extra = ([] if cache else ["--no-cache"]) + ["--llm-engine", engine]
    messages: list[dict] = []
    out = []
    with ServerProcess("--model", str(model), "--device", "cpu", "--preset", preset, "--threads", str(threads),
                       *extra, timeout=1800) as srv:
        client = OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=3600, max_retries=0)
        for i, question in enumerate(QUESTIONS[:turns]):
            content = [{"type": "image_url", "image_url": {"url": png_data_uri(image)}},
                       {"type": "text", "text": question}] if i == 0 else question
            messages.append({"role": "user", "content": content})
            t0 = time.perf_counter()
            first, pieces, chunks = None, [], 0
            stream = client.chat.completions.create(model="ovis-lite", messages=messages, max_tokens=new_tokens,
                                                    stream=True)
            for chunk in stream:
                chunks += 1
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece:
                    first = time.perf_counter() - t0 if first is None else first
                    pieces.append(piece)
            seconds = time.perf_counter() - t0
            answer = "".join(pieces)
            messages.append({"role": "assistant", "content": answer})
            print(f"server turn {i + 1}: first content chunk {first} s, whole answer {seconds:.1f} s, "
                  f"{len(answer)} chars", file=sys.stderr, flush=True)
            out.append({"ttft_s": first, "seconds": seconds, "chunks": chunks, "answer": answer})
        metrics = srv.get_json("/metrics") if cache else None
    if metrics is not None:
        out[-1]["metrics"] = metrics
    return out


def server_main(args, model: Path, image) -> dict:
    """`--server`: the turns through the server, then (unless --no-compare) through one with the caches off."""
    cached = server_turns(model, args.preset, args.threads, image, args.new_tokens, args.turns,
                          engine=args.llm_engine)
    result = {"mode": "server, openai client, streamed", "turns": cached}
    for i, turn in enumerate(cached, 1):
        result[f"turn{i}_ttft_s"] = turn["ttft_s"]
    if all(t["ttft_s"] is not None for t in cached):
        result["followup_ttft_ratio"] = cached[1]["ttft_s"] / cached[0]["ttft_s"]
        result["followup_ttft_ratios"] = [t["ttft_s"] / cached[0]["ttft_s"] for t in cached[1:]]
    if not args.no_compare:
        plain = server_turns(model, args.preset, args.threads, image, args.new_tokens, args.turns, cache=False,
                             engine=args.llm_engine)
        result["without_cache"] = [{k: t[k] for k in ("ttft_s", "seconds")} for t in plain]
        result["answers_identical_without_cache"] = [a["answer"] for a in cached] == [b["answer"] for b in plain]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/work/fullsize", help="full-size checkpoint (written here if missing)")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--size", type=int, default=896, help="square image side (default 896)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--turns", type=int, default=3, choices=[2, 3])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compare", action="store_true", help="skip the run without caches")
    ap.add_argument("--server", action="store_true",
                    help="through `ovis-lite serve` and the official openai client instead of the Python API")
    ap.add_argument("--llm-engine", default="torch",
                    help="what runs the LLM: torch (default) or llama.cpp[:FORMAT] (the optional engine)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from PIL import Image

    from lite.runtime.cpu.threads import configure_threads
    from lite.runtime.hardware import detect
    from lite.runtime.pipeline import OvisPipeline

    model = ensure_checkpoint(Path(args.model))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8))
    if args.server:
        result = {"cpu": detect().to_dict(), "preset": args.preset, "threads": args.threads, "size": args.size,
                  "new_tokens": args.new_tokens, "load_average_before": [round(x, 2) for x in os.getloadavg()],
                  **server_main(args, model, image)}
        print(json.dumps(result, indent=2, default=str) if args.json else
              {k: v for k, v in result.items() if k.endswith("ratio") or k.endswith("ttft_s")})
        return
    configure_threads(args.threads)
    t0 = time.perf_counter()
    pipe = OvisPipeline.from_pretrained(model, device="cpu", preset=args.preset, progress=False,
                                        llm_engine=args.llm_engine)
    load_s = time.perf_counter() - t0
    print(f"loaded in {load_s:.1f} s", file=sys.stderr, flush=True)
    cached = run_turns(pipe, image, args.new_tokens, args.turns)
    result = {"cpu": detect().to_dict(), "preset": args.preset, "threads": args.threads, "size": args.size,
              "llm_engine": args.llm_engine, "new_tokens": args.new_tokens, "load_s": round(load_s, 1),
              "turns": cached}
    for i, turn in enumerate(cached, 1):
        result[f"turn{i}_ttft_s"] = turn["ttft_s"]
    result["followup_ttft_ratio"] = cached[1]["ttft_s"] / cached[0]["ttft_s"]
    result["cache_stats"] = pipe.caches.stats()
    if not args.no_compare:
        pipe.caches.set_enabled(False)
        plain = run_turns(pipe, image, args.new_tokens, args.turns)
        result["without_cache"] = [{k: t[k] for k in ("ttft_s", "seconds", "tokens", "prefill_tokens")} for t in plain]
        result["tokens_identical_without_cache"] = all(a["ids"] == b["ids"] for a, b in zip(cached, plain))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        for i, turn in enumerate(cached, 1):
            print(f"turn {i}: ttft {turn['ttft_s']:.2f} s, reused {turn['prefix_tokens_reused']} positions, "
                  f"prefilled {turn['prefill_tokens']}")
        print(f"follow-up ttft ratio {result['followup_ttft_ratio']:.3f}; identical without cache: "
              f"{result.get('tokens_identical_without_cache')}")


if __name__ == "__main__":
    main()
