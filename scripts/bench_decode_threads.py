"""Decode speed with the per-call thread choice against 1 and 2 pinned threads, with no added load and with one
and two busy processes this script starts: does the per-call choice pick the faster count in each condition?

Every decode goes through the user's path, `pipe.understand` on the full-size random checkpoint in the `cpu`
preset: a ~600-token text is prefilled once, and each measured call asks it again, so the prefix KV cache
leaves one position to prefill and the decode of `--new-tokens` greedy tokens follows. The per-call choice is
the runtime's own (`lite.runtime.decode_threads.CoreWindow`, read over that call's prefill, topped up to
0.1 s); the pinned counts come from `$OVIS_LITE_DECODE_THREADS`. Conditions and modes are interleaved in rounds
(the modes' order rotates each round); a busy process is `python -c "while True: pass"`, started 1 s before
its condition's calls and killed after them.

    flock /tmp/ovis-heavy.lock python scripts/bench_decode_threads.py --json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lite.runtime.cpu.plan import PROCESS, WaitPolicy  # noqa: E402
from lite.runtime.cpu.threads import early_environment  # noqa: E402

# OpenMP's wait policy is read once, before torch starts: `--wait-policy auto` (the CLI's choice from the load
# now), `default` (spin briefly, then sleep) or `PASSIVE` (sleep at once)
_POLICY = sys.argv[sys.argv.index("--wait-policy") + 1] if "--wait-policy" in sys.argv[:-1] else "auto"
if _POLICY == "auto":
    os.environ.update(early_environment())
elif _POLICY == "default":
    os.environ.pop("OMP_WAIT_POLICY", None)
    PROCESS.wait = WaitPolicy("default", "set by --wait-policy")
else:
    os.environ["OMP_WAIT_POLICY"] = _POLICY
    PROCESS.wait = WaitPolicy(_POLICY, "set by --wait-policy")

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

BUSY = "while True: pass"
CONDITIONS = {"no added load": 0, "1 busy process": 1, "2 busy processes": 2}
TEXT = "a long text about many things, " * 42  # ~600 positions, the decode context


def per_token_overhead_ms(new_tokens: int = 64, rounds: int = 5) -> dict[str, float]:
    """Milliseconds per token on the tiny model (compute is negligible: this is the loop's own cost), our loop
    against transformers' `generate`, interleaved; medians."""
    import tempfile

    from lite.model.tiny import make_tiny
    from lite.runtime.decode import Sampling, forward_last, generate_tokens
    from lite.runtime.kv_cache import new_cache
    from lite.runtime.pipeline import OvisPipeline

    with tempfile.TemporaryDirectory() as tmp:
        pipe = OvisPipeline.from_pretrained(make_tiny(Path(tmp) / "tiny"), device="cpu", dtype=torch.float32,
                                            progress=False)
    llm = pipe.model.llm
    from transformers import Qwen3ForCausalLM  # transformers' own model with the same weights, for `generate`

    reference = Qwen3ForCausalLM(llm.config).eval()
    reference.load_state_dict(llm.state_dict())
    embeds = llm.get_input_embeddings()(torch.arange(1, 40).unsqueeze(0))
    ours, theirs = [], []
    with torch.no_grad():
        for _ in range(rounds):
            start = time.perf_counter()
            cache = new_cache(llm.config.num_hidden_layers, 40 + new_tokens)
            logits = forward_last(llm, cache, inputs_embeds=embeds)
            list(generate_tokens(llm, cache, logits, Sampling(), new_tokens, -1, []))
            ours.append((time.perf_counter() - start) * 1000 / new_tokens)
            start = time.perf_counter()
            reference.generate(inputs_embeds=embeds, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)
            theirs.append((time.perf_counter() - start) * 1000 / new_tokens)
    return {"ours_ms": round(statistics.median(ours), 3), "generate_ms": round(statistics.median(theirs), 3)}


def decode_call(pipe, new_tokens: int, pin: int | None) -> dict:
    """One follow-up call through `understand`: decode tok/s, the threads it decoded with and why."""
    from lite.runtime.decode_threads import PIN_ENV

    if pin is None:
        os.environ.pop(PIN_ENV, None)
    else:
        os.environ[PIN_ENV] = str(pin)
    try:
        stats = pipe.understand(None, TEXT, max_new_tokens=new_tokens).stats
    finally:
        os.environ.pop(PIN_ENV, None)
    decode_s = stats.phases["decode"]
    return {"tok_s": (stats.tokens - 1) / decode_s,  # the first token comes from the prefill's logits
            "tokens": stats.tokens, "prefill_tokens": stats.cache["prefill_tokens"],
            "threads": stats.settings["decode_threads"], "reason": stats.settings["decode_threads_reason"]}


def busy_processes(count: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(count)]
    time.sleep(1.0 if procs else 0.0)  # let them take their cores
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def summarize(calls: dict[str, list[dict]], threads: int) -> dict:
    """Medians per mode, the counts the per-call choice took, and whether that was the faster pinned count."""
    med = {mode: statistics.median(c["tok_s"] for c in rows) for mode, rows in calls.items()}
    pinned = {n: med[f"pinned {n}"] for n in (1, threads)}
    faster = max(pinned, key=pinned.get)
    chosen = [c["threads"] for c in calls["per call"]]
    return {"tok_s_median": {k: round(v, 2) for k, v in med.items()}, "per_call_threads": chosen,
            "faster_pinned": faster, "pinned_ratio_faster_over_slower": round(max(pinned.values()) / min(pinned.values()), 3),
            "per_call_chose_faster": all(n == faster for n in chosen),
            "per_call_over_faster_pinned": round(med["per call"] / pinned[faster], 3),
            "readings": [c["reason"] for c in calls["per call"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/work/fullsize")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="the run's threads (the most the decode may use)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--wait-policy", choices=("auto", "default", "PASSIVE"), default="auto",
                    help="OpenMP's wait policy (auto: the CLI's choice from the load at start)")
    ap.add_argument("--loop-overhead", action="store_true",
                    help="also time our decode loop against transformers' generate per token on the tiny model")
    ap.add_argument("--max-seconds", type=float, default=520.0,
                    help="start no new condition after this long; report what was measured (default 520)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still kills the busy processes

    from lite.runtime.cpu.threads import configure_threads
    from lite.runtime.hardware import detect
    from lite.runtime.pipeline import OvisPipeline

    if not (Path(args.model) / ".complete").exists():
        raise SystemExit(f"{args.model} is not a complete checkpoint; write it with scripts/write_fullsize.py")
    load_before = os.getloadavg()
    configure_threads(args.threads)
    pipe = OvisPipeline.from_pretrained(args.model, device="cpu", preset=args.preset, progress=False)
    first = pipe.understand(None, TEXT, max_new_tokens=args.new_tokens).stats  # prefills the text once
    print(f"loaded; prefilled {first.cache['prefill_tokens']} positions", file=sys.stderr, flush=True)
    modes = ["per call", "pinned 1", f"pinned {args.threads}"]
    pins = {"per call": None, "pinned 1": 1, f"pinned {args.threads}": args.threads}
    calls: dict[str, dict[str, list[dict]]] = {c: {m: [] for m in modes} for c in CONDITIONS}
    started = time.monotonic()
    for r in range(args.rounds):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        for condition, busy in CONDITIONS.items():
            if time.monotonic() - started > args.max_seconds:
                print(f"stopping at round {r + 1}, {condition}: --max-seconds reached", file=sys.stderr)
                break
            procs = busy_processes(busy)
            try:
                for mode in order:
                    call = decode_call(pipe, args.new_tokens, pins[mode])
                    calls[condition][mode].append(call)
                    print(f"round {r + 1}, {condition}, {mode}: {call['tok_s']:.2f} tok/s ({call['reason']})",
                          file=sys.stderr, flush=True)
            finally:
                stop(procs)
    result = {"cpu": detect().to_dict(), "preset": args.preset, "threads": args.threads,
              "new_tokens": args.new_tokens, "rounds": args.rounds,
              "load_average_before": [round(x, 2) for x in load_before],
              "omp_wait_policy": PROCESS.wait.value if PROCESS.wait else None,
              "wait_policy_reason": PROCESS.wait.reason if PROCESS.wait else None,
              "conditions": {c: summarize(rows, args.threads) for c, rows in calls.items()
                             if all(rows.values())},
              "calls": calls}
    if args.loop_overhead:
        result["tiny_per_token_ms"] = per_token_overhead_ms()
    result["per_call_chose_faster_everywhere"] = all(c["per_call_chose_faster"] for c in result["conditions"].values())
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for condition, row in result["conditions"].items():
            print(condition, row["tok_s_median"], "chose", row["per_call_threads"], "faster pinned",
                  row["faster_pinned"])


if __name__ == "__main__":
    main()
