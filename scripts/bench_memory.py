"""Measured activation peaks of the full-size VAE and Yak against the planner's estimates.

The offload planner (lite/memory_plan.py) adds an activation estimate to the weights it keeps on
the device; this script measures the real peaks on CPU with `offload.activations.ActivationLedger`
(random full-size weights cost the same memory as the real ones) and prints both.

    python scripts/bench_memory.py --json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--text-tokens", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import AutoencoderKL

    from lite.model import latents
    from lite.model.memory_profile import Workload, _vae_side_activation, denoise_activation
    from lite.model.modeling_yak import RefinedText, YakTransformer
    from lite.model.tiny import real_config_template
    from lite.model.config import parse_config
    from offload.activations import ActivationLedger

    cfg = parse_config(real_config_template())
    rows = []
    vae = AutoencoderKL.from_config(cfg.vae).eval()
    yak = YakTransformer(cfg.yak).to(torch.bfloat16).eval()
    for side in args.sides:
        wl = Workload("t2i", side, side, device_type="cpu", vae_dtype_bytes=4)
        z = torch.randn(1, 4, side // 8, side // 8)
        with torch.no_grad(), ActivationLedger() as led:
            t = time.perf_counter()
            vae.decode(z)
            secs = time.perf_counter() - t
        rows.append({"what": f"VAE decode fp32 {side}x{side}", "measured_bytes": led.peak_bytes,
                     "estimated_bytes": _vae_side_activation(cfg, side, side, wl), "seconds": secs})
        with torch.no_grad(), ActivationLedger() as led:
            vae.encode(torch.randn(1, 3, side, side))
        rows.append({"what": f"VAE encode fp32 {side}x{side}", "measured_bytes": led.peak_bytes,
                     "estimated_bytes": _vae_side_activation(cfg, side, side, wl), "seconds": None})
        n = (side // 16) ** 2
        text = RefinedText(torch.randn(1, args.text_tokens, cfg.yak.hidden_size, dtype=torch.bfloat16),
                           torch.randn(1, cfg.yak.hidden_size, dtype=torch.bfloat16))
        img = torch.randn(1, n, 16, dtype=torch.bfloat16)
        with torch.no_grad(), ActivationLedger() as led:
            t = time.perf_counter()
            yak(img, latents.image_ids(side // 16, side // 16), text, torch.tensor([0.5], dtype=torch.bfloat16))
            secs = time.perf_counter() - t
        per_pass_estimate = denoise_activation(cfg, Workload("t2i", side, side, device_type="cpu"))
        rows.append({"what": f"Yak bf16 pass {side}x{side} ({n}+{args.text_tokens} tokens)",
                     "measured_bytes": led.peak_bytes, "estimated_bytes": per_pass_estimate, "seconds": secs})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['what']:<44} measured {r['measured_bytes'] / 2**20:8.1f} MiB   "
                  f"estimate {r['estimated_bytes'] / 2**20:8.1f} MiB")


if __name__ == "__main__":
    main()
