"""The `cpu` preset's int8 tied head against the bf16 head it replaces: logit error, greedy agreement, time per token.

    python scripts/bench_head_format.py --json [--checkpoint /work/fullsize | --tiny] [--tokens 64]

The pipeline is loaded once in the `cpu` preset (int8 embedding and head). A greedy run of `--tokens` tokens
feeds the LLM its own choices; at every step the same final hidden state also goes through the bf16 head
(the checkpoint's embedding table read as stored, in bf16), so both heads are compared on identical inputs:
max |logit error| (absolute, and over the bf16 logits' standard deviation), and the fraction of steps whose
argmax agrees. Then the two heads' one-row calls are timed interleaved (median), as a decoded token runs them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

EMBED = "llm.model.embed_tokens.weight"


def stored_embedding(checkpoint: Path) -> torch.Tensor:
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(checkpoint / index[EMBED], framework="pt") as f:
        return f.get_tensor(EMBED).to(torch.bfloat16)


def bf16_head(weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The bf16 head as the runtime ran it before (a bf16 GEMV, ATen's kernel: the fastest on AMD EPYC)."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        return torch.mv(weight, hidden.reshape(-1).to(weight.dtype))
    finally:
        torch.backends.mkldnn.enabled = enabled


@torch.no_grad()
def compare(checkpoint: Path, tokens: int, threads: int) -> dict[str, object]:
    from lite import OvisPipeline
    from quant import Int8Linear

    torch.set_num_threads(threads)
    pipe = OvisPipeline.from_pretrained(str(checkpoint), device="cpu", preset="cpu", progress=False)
    llm = pipe.model.llm
    head = llm.lm_head
    assert isinstance(head, Int8Linear), f"the cpu preset's head is {type(head).__name__}, not Int8Linear"
    weight = stored_embedding(checkpoint)
    ids = pipe.tokenizer("Describe a quiet harbour at dawn, the boats and the light.", return_tensors="pt").input_ids
    out = llm.model(input_ids=ids, use_cache=True)
    past, hidden = out.past_key_values, out.last_hidden_state[:, -1:]
    errors, rel, agree = [], [], 0
    for _ in range(tokens):
        ours = head(hidden).float().reshape(-1)
        ref = bf16_head(weight, hidden).float()
        errors.append(float((ours - ref).abs().max()))
        rel.append(errors[-1] / float(ref.std()))
        token = int(ours.argmax())
        agree += token == int(ref.argmax())
        out = llm.model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past, hidden = out.past_key_values, out.last_hidden_state[:, -1:]
    times: dict[str, list[float]] = {"int8": [], "bf16": []}
    for _ in range(9):
        for name, fn in (("int8", lambda: head(hidden)), ("bf16", lambda: bf16_head(weight, hidden))):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ms = {k: 1000 * statistics.median(v[1:]) for k, v in times.items()}
    return {"checkpoint": str(checkpoint), "vocab": weight.shape[0], "hidden": weight.shape[1], "tokens": tokens,
            "greedy_agreement": agree / tokens, "max_abs_logit_error": max(errors),
            "max_logit_error_over_std": max(rel), "mean_logit_error_over_std": statistics.mean(rel),
            "head_ms_int8": ms["int8"], "head_ms_bf16": ms["bf16"], "head_speedup": ms["bf16"] / ms["int8"],
            "head_bytes_int8": head.qweight.numel() + 4 * head.scale.numel(), "head_bytes_bf16": 2 * weight.numel(),
            "threads": threads}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("/work/fullsize"))
    ap.add_argument("--tiny", action="store_true", help="a seeded tiny checkpoint instead")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.tiny:
        from lite.model.tiny import make_tiny

        with tempfile.TemporaryDirectory() as tmp:
            result = compare(make_tiny(Path(tmp) / "tiny", dtype=torch.bfloat16), args.tokens, args.threads)
    else:
        result = compare(args.checkpoint, args.tokens, args.threads)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
