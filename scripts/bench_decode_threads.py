"""Decode speed with 1 thread, all threads, and the per-call policy, on the machine as it is and with a busy
process loading one core: does the policy pick the faster count in both?

The LLM of the full-size random checkpoint in the `cpu` preset prefills a ~600-token text once; each
measurement decodes `--new-tokens` greedy tokens from a copy of that KV (the user's decode loop,
`lite.runtime.decode`). Conditions and thread counts are interleaved in rounds; the policy reads the
cores over a short window before each of its runs (`lite.runtime.decode_threads.CoreWindow`).

    flock /tmp/ovis-heavy.lock python scripts/bench_decode_threads.py --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

BUSY = "while True: pass"


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


def decode_rate(llm, snap, positions: int, new_tokens: int, threads: int) -> float:
    """Tokens per second of a greedy decode of `new_tokens` after the kept prefix, with `threads`."""
    from lite.runtime.decode import Sampling, forward_last, generate_tokens
    from lite.runtime.kv_cache import new_cache

    cache = new_cache(llm.config.num_hidden_layers, positions + new_tokens + 1, snap, positions - 1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            logits = forward_last(llm, cache, token=snap.positions[-1])
            start = time.perf_counter()
            count = sum(1 for _ in generate_tokens(llm, cache, logits, Sampling(), new_tokens, -1, []))
            return (count - 1) / (time.perf_counter() - start)  # the first token needs no forward
    finally:
        torch.set_num_threads(before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/work/fullsize")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    overhead = per_token_overhead_ms()
    from lite.runtime.decode import forward_last
    from lite.runtime.decode_threads import CoreWindow
    from lite.runtime.cpu.threads import configure_threads
    from lite.runtime.hardware import detect
    from lite.runtime.kv_cache import new_cache, snapshot
    from lite.runtime.pipeline import OvisPipeline

    configure_threads(args.threads)
    if not (Path(args.model) / ".complete").exists():
        raise SystemExit(f"{args.model} is not a complete checkpoint; write it with scripts/write_fullsize.py")
    pipe = OvisPipeline.from_pretrained(args.model, device="cpu", preset=args.preset, progress=False)
    llm = pipe.model.llm
    ids = pipe.tokenizer("a long text about many things " * 100, add_special_tokens=False)["input_ids"][:600]
    cache = new_cache(llm.config.num_hidden_layers, len(ids) + 1)
    with torch.no_grad():
        forward_last(llm, cache, inputs_embeds=llm.get_input_embeddings()(torch.tensor([ids])))
    snap = snapshot(cache, tuple(ids))
    print(f"loaded and prefilled; tiny per-token ms {overhead}", file=sys.stderr, flush=True)

    rates: dict[str, dict[str, list[float]]] = {"as is": {}, "one core busy": {}}
    choices: dict[str, list[str]] = {"as is": [], "one core busy": []}
    for _ in range(args.rounds):
        for condition in rates:
            busy = subprocess.Popen([sys.executable, "-c", BUSY]) if condition == "one core busy" else None
            try:
                time.sleep(0.5 if busy else 0.0)  # let the busy process take its core
                window = CoreWindow.start()
                time.sleep(0.3)
                chosen, reason = window.decode_threads(args.threads)
                choices[condition].append(reason)
                for label, threads in (("1 thread", 1), (f"{args.threads} threads", args.threads),
                                       ("policy", chosen)):
                    rates[condition].setdefault(label, []).append(decode_rate(llm, snap, len(ids), args.new_tokens,
                                                                               threads))
                    print(f"{condition}, {label}: {rates[condition][label][-1]:.2f} tok/s ({reason})",
                          file=sys.stderr, flush=True)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    result = {"cpu": detect().to_dict(), "preset": args.preset, "new_tokens": args.new_tokens, "rounds": args.rounds,
              "tiny_per_token_ms": overhead,
              "tok_s_median": {c: {k: round(statistics.median(v), 2) for k, v in r.items()} for c, r in rates.items()},
              "tok_s_all": rates, "policy_readings": choices}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for condition, row in result["tok_s_median"].items():
            print(condition, row, choices[condition])


if __name__ == "__main__":
    main()
