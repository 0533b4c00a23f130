"""Host memory measured against the plan: whole CLI runs per task, the runtime alone, and activation peaks.

`--tasks understand t2i edit` (the laptop case, issue 26 item 5): each task runs as its own CLI process on
the full-size checkpoint (`scripts/write_fullsize.py`) at `--size`, while this process samples the child's
`/proc/PID/smaps_rollup` every 10 ms (peak anonymous, peak mapped = file-backed, peak RSS; the RSS peak is
also the kernel's exact one from `wait4`). Each is printed beside the CPU host plan of the same task
(`lite.model.host_plan`). The peak does not depend on the step count (every step runs the same passes over
the same tensors, and the guided passes of a step run one after another), so one step with its guided passes
off (`--steps 1 --cfg-interval 0 0`, NFE 1) exercises it: every condition built and held, one Yak pass over
all the image tokens, and the full-size VAE decode (and encode, for edits). Slow at 1024x1024 on 2 cores and several GB: run it
under the heavy lock, one task per call if need be.

`--vae-decode`: diffusers' plain `vae.decode` against `lite.runtime.lean_vae.lean_decode` on the full-size fp32
VAE (random weights) at each `--sides` side, in one process: the peak RSS each adds over what was resident
before it (VmHWM, reset through /proc/self/clear_refs), in full-resolution 128-channel maps, its seconds, and
whether the two images are bitwise equal; then the plain `vae.encode` of a random image of that side (an
edit's source), which runs as diffusers has it.

`--runtime`: the RSS of the interpreter with the runtime imported, no weight (the plan's RUNTIME_* bytes).

Default: activation peaks of the full-size VAE and Yak against the planner's estimates, measured with
`offload.activations.ActivationLedger` (random full-size weights cost the same memory as the real ones).

    flock /tmp/ovis-heavy.lock python scripts/bench_memory.py --tasks t2i --model /work/fullsize --json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lite.memory import HostPeakSampler

GiB = 1 << 30


def task_command(task: str, model: str, preset: str, size: int, steps: int, work: Path) -> list[str]:
    """The CLI call of one task at `size`x`size` (a noise image for understanding and edits)."""
    from PIL import Image

    image = work / "input.png"
    if not image.exists():
        gen = torch.Generator().manual_seed(0)
        Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8).numpy()).save(image)
    common = ["--model", model, "--preset", preset, "--device", "cpu", "--quiet", "--json"]
    if task == "understand":
        return ["ask", str(image), "Describe the image.", "--max-new-tokens", "8", *common]
    # One step, its guided passes off (`--cfg-interval 0 0`: the conditional pass alone): every condition is
    # still built and held, and a pass over all the image tokens still runs, one pass at a time.
    out = ["-o", str(work / f"{task}.png"), "--overwrite", "--steps", str(steps), "--cfg-interval", "0", "0"]
    if task == "t2i":
        return ["generate", "a red fox in the snow", "--width", str(size), "--height", str(size), *out, *common]
    return ["edit", str(image), "add a hat", *out, *common]


def measure_task(task: str, args: argparse.Namespace, work: Path) -> dict:
    """Run one task in a child process, sampling its memory from here; the plan of the same task beside it."""
    cmd = [sys.executable, "-m", "lite", *task_command(task, args.model, args.preset, args.size, args.steps, work)]
    start = time.perf_counter()
    with open(work / f"{task}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            with HostPeakSampler(proc.pid, interval=0.01) as peak:
                _, status, usage = os.wait4(proc.pid, 0)
        finally:
            if proc.returncode is None and proc.poll() is None:  # stopped (e.g. by `timeout`): no orphan run
                proc.kill()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{task} failed ({proc.returncode}): {(work / f'{task}.log').read_text()[-2000:]}")
    return {"task": task, "seconds": round(time.perf_counter() - start, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "peak_anon_bytes": peak.peak_anon, "peak_mapped_bytes": peak.peak_mapped,
            "sampled_peak_rss_bytes": peak.peak_rss, "plan": plan_of(task, args)}


def plan_of(task: str, args: argparse.Namespace) -> dict:
    from lite.model.config import load_config, load_preprocessor_config
    from lite.model.host_plan import host_plan
    from lite.model.skeleton import skeleton_model
    from lite.runtime.planning import preset_workload
    from lite.runtime.presets import get_preset

    preset = get_preset(args.preset)
    config, pp = load_config(args.model), load_preprocessor_config(args.model)
    wl = preset_workload(preset, task, args.size, args.size, "cpu", max_new_tokens=8 if task == "understand" else 1024)
    plan = host_plan(skeleton_model(config), config, pp, wl, preset.precision.policy("cpu"))
    return {"peak_bytes": plan.peak.total, "peak_phase": plan.peak_phase, "anon_bytes": plan.peak.anon,
            "mapped_bytes": plan.peak.mapped,
            "phases": {k: {"anon": v.anon, "mapped": v.mapped} for k, v in plan.phases.items()}}


def runtime_rss() -> dict:
    """The runtime imported, no weight: what the plan's RUNTIME_* constants stand for."""
    code = ("import torch, lite.runtime.pipeline, lite.model.modeling_ovis_u1; torch.ones(64, 64) @ torch.ones(64, 64); "
            "from lite.memory import host_memory; m = host_memory(); print(m.anon, m.mapped)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {"anon_bytes": int(out[0]), "mapped_bytes": int(out[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--tasks", nargs="+", choices=("understand", "t2i", "edit"), help="measure whole CLI runs")
    ap.add_argument("--runtime", action="store_true", help="measure the runtime's own RSS (no weights)")
    ap.add_argument("--vae-decode", action="store_true", help="plain vs lean VAE decode: peak, time, bitwise")
    ap.add_argument("--model", default="/work/fullsize", help="full-size checkpoint for --tasks")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--size", type=int, default=1024, help="image side for --tasks")
    ap.add_argument("--steps", type=int, default=1, help="denoising steps for --tasks (the peak does not depend on it)")
    ap.add_argument("--sides", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--text-tokens", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` ends the child run too (finally)
    if args.runtime or args.tasks:
        rows = [runtime_rss()] if args.runtime else []
        with tempfile.TemporaryDirectory() as work:
            rows += [measure_task(task, args, Path(work)) for task in args.tasks or ()]
        print(json.dumps(rows, indent=2) if args.json else "\n".join(_task_line(r) for r in rows))
        return
    torch.set_num_threads(args.threads)
    if args.vae_decode:
        rows = vae_decode_rows(args.sides)
        print(json.dumps(rows, indent=2) if args.json else "\n".join(_vae_line(r) for r in rows))
        return

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


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"/proc/self/status has no {field} (Linux only)")


def _peak_over_resident(fn):
    """(result, seconds, bytes the call's peak RSS rose above the RSS before it)."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_bytes("VmRSS")
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t, _status_bytes("VmHWM") - before


def vae_decode_rows(sides: list[int]) -> list[dict]:
    """Plain and lean decodes of one seeded latent per side, alternating, on the full-size fp32 VAE."""
    from diffusers import AutoencoderKL

    from lite.memory import trim_host_heap
    from lite.model.config import parse_config
    from lite.model.tiny import real_config_template
    from lite.runtime.lean_vae import lean_decode

    cfg = parse_config(real_config_template())
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(cfg.vae).eval()
    rows = []
    for side in sides:
        z = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(side))
        full_map = cfg.vae["block_out_channels"][0] * side * side * 4
        with torch.no_grad():
            plain, plain_s, plain_peak = _peak_over_resident(lambda: vae.decode(z).sample)
            trim_host_heap()
            lean, lean_s, lean_peak = _peak_over_resident(lambda: lean_decode(vae, z))
            trim_host_heap()
            pixels = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(side)) * 2 - 1
            _, encode_s, encode_peak = _peak_over_resident(lambda: vae.encode(pixels).latent_dist.mean)
        rows.append({"what": f"VAE decode fp32 {side}x{side}", "bitwise_equal": bool(torch.equal(plain, lean)),
                     "plain_peak_bytes": plain_peak, "lean_peak_bytes": lean_peak, "full_map_bytes": full_map,
                     "plain_maps": round(plain_peak / full_map, 2), "lean_maps": round(lean_peak / full_map, 2),
                     "plain_seconds": round(plain_s, 1), "lean_seconds": round(lean_s, 1),
                     "encode_peak_bytes": encode_peak, "encode_maps": round(encode_peak / full_map, 2),
                     "encode_seconds": round(encode_s, 1)})
        del plain, lean
        trim_host_heap()
    return rows


def _vae_line(r: dict) -> str:
    return (f"{r['what']}: plain peak {r['plain_peak_bytes'] / GiB:.2f} GiB ({r['plain_maps']} maps, "
            f"{r['plain_seconds']} s), lean {r['lean_peak_bytes'] / GiB:.2f} GiB ({r['lean_maps']} maps, "
            f"{r['lean_seconds']} s), bitwise equal: {r['bitwise_equal']}; plain encode "
            f"{r['encode_peak_bytes'] / GiB:.2f} GiB ({r['encode_maps']} maps, {r['encode_seconds']} s)")


def _task_line(r: dict) -> str:
    if "task" not in r:
        return f"runtime: anonymous {r['anon_bytes'] / GiB:.2f} GiB, mapped {r['mapped_bytes'] / GiB:.2f} GiB"
    p = r["plan"]
    return (f"{r['task']:<10} measured peak RSS {r['peak_rss_bytes'] / GiB:.2f} GiB (anonymous "
            f"{r['peak_anon_bytes'] / GiB:.2f}, mapped {r['peak_mapped_bytes'] / GiB:.2f}); planned "
            f"{p['peak_bytes'] / GiB:.2f} GiB in {p['peak_phase']} (anonymous {p['anon_bytes'] / GiB:.2f}, mapped "
            f"{p['mapped_bytes'] / GiB:.2f}); {r['seconds']:.0f} s")


if __name__ == "__main__":
    main()
