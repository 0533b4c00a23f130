"""Speed of each weight format on the real-size LLM and Yak, against bf16, on one device.

LLM (Qwen3-1.7B shape): prefill of N tokens and greedy decode of M tokens with the KV cache.
Yak (1.1B MMDiT): one pass at 1024x1024 (4096 image + 300 text tokens).
Formats: bf16, the `balanced` policy's 4-bit LLM (NF4 on CUDA, quanto int4 elsewhere) and 8-bit Yak.
Random weights: they cost the same compute as the real ones.

    python scripts/bench_formats.py --device cuda --json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from benchtools import time_calls


def _timed(fn, device: torch.device, repeats: int) -> float:
    return statistics.median(time_calls(fn, device, repeats))


def _random_(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    module.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02, generator=gen) if p.dim() >= 2 else p.fill_(1.0)
    return module.to(dtype)


def bench_llm(cfg, device: torch.device, fmt: str, prompt: int, new: int, repeats: int) -> dict:
    from transformers import Qwen3ForCausalLM

    from lite.model.precision import policy_for
    from quant import quantize

    with torch.device("meta"):
        llm = Qwen3ForCausalLM(cfg.qwen3_config())
    llm = _random_(llm, device, torch.bfloat16)
    llm.model.rotary_emb = type(llm.model.rotary_emb)(llm.config).to(device)
    llm.lm_head.weight = llm.model.embed_tokens.weight
    if fmt != "bf16":
        spec = policy_for("balanced", device.type).resolved("llm")
        quantize(llm, spec, device=device)  # the spec includes model.layers.* only
    llm.eval()
    ids = torch.randint(0, min(1000, llm.config.vocab_size), (1, prompt), device=device)
    with torch.no_grad():
        prefill = _timed(lambda: llm(input_ids=ids, logits_to_keep=1), device, repeats)
        gen = _timed(lambda: llm.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False),
                     device, max(1, repeats // 2))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del llm
    return {"prefill_s": prefill, "decode_s_per_token": max(gen - prefill, 0) / new, "peak_bytes": peak}


def bench_yak(cfg, device: torch.device, fmt: str, side: int, text: int, repeats: int) -> dict:
    from lite.model import latents
    from lite.model.modeling_yak import RefinedText, YakTransformer
    from lite.model.precision import policy_for
    from quant import quantize

    with torch.device("meta"):
        yak = YakTransformer(cfg.yak)
    yak = _random_(yak, device, torch.bfloat16).eval()
    if fmt != "bf16":
        quantize(yak, policy_for("balanced", device.type).resolved("yak"), device=device)
    n = (side // 16) ** 2
    gen = torch.Generator(device=device).manual_seed(1)
    img = torch.randn(1, n, 16, generator=gen, device=device, dtype=torch.bfloat16)
    txt = RefinedText(torch.randn(1, text, cfg.yak.hidden_size, generator=gen, device=device, dtype=torch.bfloat16),
                      torch.randn(1, cfg.yak.hidden_size, generator=gen, device=device, dtype=torch.bfloat16))
    ids = latents.image_ids(side // 16, side // 16, device=device)
    t = torch.tensor([0.5], device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        secs = _timed(lambda: yak(img, ids, txt, t), device, repeats)
    del yak
    return {"pass_s": secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--text-tokens", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--parts", default="llm,yak")
    ap.add_argument("--config", help="a config.json (default: the real Ovis-U1-3B config)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from lite.model.config import load_config, parse_config
    from lite.model.tiny import real_config_template

    cfg = load_config(args.config) if args.config else parse_config(real_config_template())
    device = torch.device(args.device)
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else args.device}
    for fmt in ("bf16", "balanced"):
        if "llm" in args.parts:
            out[f"llm_{fmt}"] = bench_llm(cfg, device, fmt, args.prompt_tokens, args.new_tokens, args.repeats)
        if "yak" in args.parts:
            out[f"yak_{fmt}"] = bench_yak(cfg, device, fmt, args.side, args.text_tokens, args.repeats)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    print(json.dumps(out, indent=2) if args.json else out)


if __name__ == "__main__":
    main()
