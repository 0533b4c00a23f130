"""How far each LLM engine's logits are from the bf16 LLM: ours in the `cpu` preset (int4 layers, int8 head)
and llama.cpp (`--llm-engine llama.cpp:FORMAT`), on identical inputs.

    python scripts/bench_engine_fidelity.py --json [--checkpoint /work/fullsize] [--prompts 3] [--tokens 16]

The reference is the checkpoint's LLM in bf16 (no preset). For each prompt (a seeded random 448x448 image and a
question) it builds the prompt's embeddings once (our ViT, visual head and `merge_multimodal`, in bf16) and
decodes `--tokens` greedy tokens; every engine is then fed exactly that sequence (the same embeddings, the same
continuation, teacher-forced) and its logits at each decoded position are compared with the reference's:
relative L2 error, KL(reference || engine) of the softmax, and the fraction of positions whose argmax agrees.
Engines are loaded one at a time (the host holds one model beside the reference's saved tensors).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # cpuname

from cpuname import cpu_name  # noqa: E402
from lite import OvisPipeline  # noqa: E402
from lite.model.config import load_config  # noqa: E402
from lite.model.processing import understanding_prompt  # noqa: E402
from lite.runtime.decode import forward_last  # noqa: E402
from lite.runtime.kv_cache import new_cache  # noqa: E402
from lite.runtime.understanding import build_prompt  # noqa: E402


def reference_sequences(checkpoint: str, prompts: int, tokens: int) -> list[dict[str, torch.Tensor]]:
    """Per prompt: the full input embeddings (prompt + greedy continuation), the prompt length and the bf16
    logits at the positions that chose each continuation token."""
    pipe = OvisPipeline.from_pretrained(checkpoint, device="cpu", dtype=torch.bfloat16, progress=False, cache=False)
    llm, embed = pipe.model.llm, pipe.model.llm.get_input_embeddings()
    out = []
    for seed in range(prompts):
        rng = np.random.default_rng(seed)
        image = Image.fromarray(rng.integers(0, 255, (448, 448, 3), dtype=np.uint8))
        with torch.no_grad():
            prompt = build_prompt(pipe, understanding_prompt(f"Describe picture {seed} in detail.", 1), [image], {})
            cache = new_cache(llm.config.num_hidden_layers, prompt.embeds.shape[1] + tokens)
            rows = [forward_last(llm, cache, inputs_embeds=prompt.embeds)[0]]
            chosen = []
            for step in range(tokens):
                chosen.append(int(rows[-1].argmax()))
                if step + 1 < tokens:
                    rows.append(forward_last(llm, cache, token=chosen[-1])[0])
            seq = torch.cat([prompt.embeds, embed(torch.tensor([chosen]))], dim=1)
        out.append({"embeds": seq.float(), "prompt_len": prompt.embeds.shape[1], "logits": torch.stack(rows)})
    del pipe, llm, embed
    gc.collect()
    return out


def compare(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    rel = float((got - want).norm() / want.norm())
    kl = float(torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                          reduction="batchmean"))
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    return {"rel_l2": rel, "kl": kl, "top1_agree": agree}


def torch_cpu_preset(checkpoint: str, seqs: list[dict[str, Any]]) -> list[dict[str, float]]:
    pipe = OvisPipeline.from_pretrained(checkpoint, device="cpu", preset="cpu", progress=False, cache=False)
    rows = []
    for s in seqs:
        with torch.no_grad():
            emb = s["embeds"][:, :-1].to(pipe.dtype)
            logits = pipe.model.llm(inputs_embeds=emb).logits[0, s["prompt_len"] - 1:].float()
        rows.append(compare(logits, s["logits"]))
    del pipe
    gc.collect()
    return rows


def llama_engine(checkpoint: str, fmt: str, seqs: list[dict[str, Any]]) -> list[dict[str, float]]:
    from lite.runtime.llama_engine import LlamaCppLLM

    engine = LlamaCppLLM.open(Path(checkpoint), load_config(checkpoint), fmt)
    rows = []
    for s in seqs:
        engine.forget()
        emb, n = s["embeds"], s["prompt_len"]
        got = [engine.prefill(emb[:, :n], tuple(range(n)), 0, emb.shape[1])[0][0]]
        for i in range(n, emb.shape[1] - 1):
            got.append(engine.step(emb[0, i], i)[0])
        rows.append(compare(torch.stack(got), s["logits"]))
    engine.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/work/fullsize")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--formats", nargs="+", default=["q4_0", "q8_0"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    seqs = reference_sequences(args.checkpoint, args.prompts, args.tokens)
    engines = {"torch:cpu-preset": torch_cpu_preset(args.checkpoint, seqs)}
    for fmt in args.formats:
        engines[f"llama.cpp:{fmt}"] = llama_engine(args.checkpoint, fmt, seqs)
    result = {"cpu": cpu_name(), "prompts": args.prompts, "tokens": args.tokens,
              "engines": {name: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
                          for name, rows in engines.items()}}
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
