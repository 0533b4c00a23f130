"""Full-size fidelity of a quantization preset against bf16: same checkpoint, same inputs, same seed.

Reports the LLM condition's cosine similarity, next-token top-1 agreement over the prompt, the Yak
velocity's relative error at the first step, and the final image's PSNR.

    python scripts/bench_fidelity.py --model /tmp/ovis-lite-full --preset balanced --size 128 --steps 2 --json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch


def _condition_parts(pipe, prompt: str, width: int, height: int):
    from lite.model.processing import T2I_PREFIX, generation_prompt, white_canvas

    with torch.no_grad():
        embeds = pipe._llm_inputs(generation_prompt(T2I_PREFIX + prompt), [white_canvas(width, height)], True)
        out = pipe.model.llm.model(inputs_embeds=embeds, output_hidden_states=True)
        cond = torch.cat([out.hidden_states[-1], out.hidden_states[-2]], -1)
        logits = pipe.model.llm.lm_head(out.hidden_states[-1])
    return embeds, cond.float(), logits.argmax(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lite.model import latents
    from lite.runtime.pipeline import OvisPipeline

    prompt, w, h = "a red fox in the snow", args.size, args.size
    results: dict = {"preset": args.preset, "size": args.size, "steps": args.steps}
    pipes = {}
    for name in ("reference", args.preset):
        t = time.perf_counter()
        pipes[name] = OvisPipeline.from_pretrained(args.model, device="cpu", preset=name, progress=False)
        results[f"load_s_{name}"] = time.perf_counter() - t
    ref, q = pipes["reference"], pipes[args.preset]

    embeds, cond_ref, top_ref = _condition_parts(ref, prompt, w, h)
    _, cond_q, top_q = _condition_parts(q, prompt, w, h)
    results["condition_cosine"] = torch.nn.functional.cosine_similarity(cond_ref.flatten(), cond_q.flatten(),
                                                                        dim=0).item()
    results["top1_agreement"] = (top_ref == top_q).float().mean().item()

    noise = latents.pack(latents.latent_noise(h, w, 42, torch.device("cpu"), torch.bfloat16))
    ids = latents.image_ids(h // 16, w // 16)
    t1 = torch.tensor([ref.timesteps(args.steps, (h // 16) * (w // 16))[0]], dtype=torch.bfloat16)
    with torch.no_grad():
        v_ref = ref.model.visual_generator.backbone(noise, ids, ref.refine(cond_ref.to(torch.bfloat16)), t1).float()
        v_q = q.model.visual_generator.backbone(noise, ids, q.refine(cond_ref.to(torch.bfloat16)), t1).float()
    results["yak_velocity_relerr"] = ((v_q - v_ref).norm() / v_ref.norm()).item()

    images = {}
    for name, pipe in pipes.items():
        t = time.perf_counter()
        images[name] = np.asarray(pipe.generate(prompt, width=w, height=h, steps=args.steps, seed=42).image).astype(float)
        results[f"t2i_s_{name}"] = time.perf_counter() - t
    mse = float(((images["reference"] - images[args.preset]) ** 2).mean())
    results["image_psnr_db"] = float("inf") if mse == 0 else 10 * math.log10(255 ** 2 / mse)
    print(json.dumps(results, indent=2) if args.json else results)


if __name__ == "__main__":
    main()
