"""Benchmark quantization: single large linears, and Ovis-U1 per-component policies.

Usage: python scripts/bench_quant.py [--json] [--sections linear,bytes,fidelity,load] [--repeats N]
                                     [--shapes 4096x4096,6144x2048] [--full-dir /tmp/ovis-lite-full]
Sections:
  linear    formats/backends on single linears: bytes, error, speed, quantize time. Shapes are
            out x in; reference is the fp32 layer; relerr = ||y - y_fp32|| / ||y_fp32||.
  bytes     exact bytes per component per policy of the full-size architecture (meta model, cpu and
            cuda backends), cross-checked by materialising one LLM decoder layer and one Yak double
            block with random weights and quantizing them for real.
  fidelity  per policy vs the unquantized bf16 model on the same inputs: LLM condition cosine,
            next-token top-1 agreement, Yak velocity relative error; tiny model (plus final-image
            PSNR through the pipeline) and full-width random weights (reduced depth, see below).
  load      streaming quantized load (balanced) of the full-size random checkpoint written by
            scripts/bench_load.py, peak RssAnon sampled every 5 ms in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from offload.accounting import module_nbytes  # noqa: E402
from quant import QuantSpec, layer_kind, layout_nbytes, quantize_linear_from_weight  # noqa: E402

CASES: list[tuple[str, QuantSpec]] = [
    ("fp32 dense", QuantSpec("none")),
    ("bf16 dense", QuantSpec("bf16")),
    ("nf4 bnb", QuantSpec("nf4")),
    ("nf4 bnb dq", QuantSpec("nf4", double_quant=True)),
    ("fp4 bnb", QuantSpec("fp4")),
    ("int4 quanto", QuantSpec("int4")),
    ("int8 quanto", QuantSpec("int8")),
    ("fp8 quanto", QuantSpec("fp8")),
    ("int8 torch", QuantSpec("int8", backend="torch")),
]


def _input_dtype(spec: QuantSpec) -> torch.dtype:
    """Activations in the layer's own dtype (fp32 for the untouched reference layer)."""
    return {"none": torch.float32, "fp16": torch.float16}.get(spec.format, spec.compute_dtype)


def _time_ms(fn, repeats: int) -> float:
    fn()  # warm-up (bnb/quanto pick kernels on first call)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) * 1000 / repeats


@torch.no_grad()
def bench_shape(out_f: int, in_f: int, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    x1 = torch.randn(1, in_f, generator=g)
    x256 = torch.randn(256, in_f, generator=g)
    ref = x256 @ w.T
    rows = []
    for label, spec in CASES:
        t0 = time.perf_counter()
        layer = quantize_linear_from_weight(w, None, spec)
        q_ms = (time.perf_counter() - t0) * 1000
        kind = layer_kind(layer)
        in_dtype = _input_dtype(spec)
        a1, a256 = x1.to(in_dtype), x256.to(in_dtype)
        y = layer(a256).float()
        nbytes = module_nbytes(layer)
        lay = layout_nbytes(out_f, in_f, False, spec, torch.float32 if spec.format == "none" else None)["total"]
        rows.append({
            "shape": f"{out_f}x{in_f}", "case": label, "format": kind.format if kind else "fp32",
            "backend": kind.backend if kind else "torch", "bytes": nbytes, "layout_bytes": lay,
            "bytes_vs_bf16": round(nbytes / (out_f * in_f * 2), 4),
            "relerr": round(((y - ref).norm() / ref.norm()).item(), 5),
            "ms_m1": round(_time_ms(lambda: layer(a1), repeats), 3),
            "ms_m256": round(_time_ms(lambda: layer(a256), max(1, repeats // 2)), 3),
            "quantize_ms": round(q_ms, 1),
        })
        del layer
    return rows


def bench_linear(args: argparse.Namespace) -> list[dict]:
    for _, spec in CASES:  # import backends and build kernels once, outside the timings
        quantize_linear_from_weight(torch.randn(256, 256), None, spec)(torch.randn(1, 256).to(_input_dtype(spec)))
    rows = []
    for s in args.shapes.split(","):
        o, i = (int(v) for v in s.lower().split("x"))
        rows.extend(bench_shape(o, i, args.repeats))
    return rows


# -- Ovis-U1 policies ------------------------------------------------------------------------------

POLICIES = ("reference", "balanced", "low", "tiny", "minimal", "mps", "cpu")


def _full_config():
    from importlib import resources

    from lite.model.config import parse_config

    return parse_config(json.loads(resources.files("lite").joinpath("data/config.json").read_text()))


def _shallow(config, llm_layers: int, yak_double: int, yak_single: int):
    """The full-size config with fewer blocks (every width unchanged)."""
    import dataclasses

    llm = dict(config.llm, num_hidden_layers=llm_layers, max_window_layers=llm_layers)
    yak = dataclasses.replace(config.yak, depth=yak_double, depth_single_blocks=yak_single)
    vision = dataclasses.replace(config.vision, num_hidden_layers=1)
    return dataclasses.replace(config, llm=llm, yak=yak, vision=vision)


@torch.no_grad()
def bench_bytes() -> dict:
    """quantized_bytes per policy (cpu and cuda), and real quantized blocks vs make_sizeof on meta."""

    from lite.model.sizes import meta_model
    from lite.model.precision import policy_for
    from lite.model.quantize import quantize_model
    from lite.model.sizes import make_sizeof, quantized_bytes
    from lite.model.tiny import randomize_

    config = _full_config()
    out: dict = {"policies": {}, "cross_check": []}
    for device_type in ("cpu", "cuda"):
        for name in POLICIES:
            r = quantized_bytes(config, policy_for(name, device_type))
            out["policies"][f"{name}@{device_type}"] = {
                "formats": r["formats"], "total_bytes": r["total_bytes"],
                "components": {c: v["bytes"] for c, v in r["components"].items()}}
    # Real layers: a model whose LLM has 1 decoder layer and whose Yak has 1 double + 1 single block,
    # every other size full; quantize it and compare each block with the meta prediction.
    cfg = _shallow(config, 1, 1, 1)
    for name in ("balanced", "tiny", "minimal"):
        policy = policy_for(name, "cpu")
        meta = meta_model(cfg)
        sizeof = make_sizeof(meta, policy)
        model = meta_model(cfg)
        model.llm.model.layers.to_empty(device="cpu")
        model.visual_generator.backbone.double_blocks.to_empty(device="cpu")
        model.visual_generator.backbone.single_blocks.to_empty(device="cpu")
        model.visual_tokenizer.backbone.trunk.blocks.to_empty(device="cpu")
        for blocks in (model.llm.model.layers, model.visual_generator.backbone.double_blocks,
                       model.visual_generator.backbone.single_blocks, model.visual_tokenizer.backbone.trunk.blocks):
            randomize_(blocks, 0)
            blocks.to(torch.bfloat16)
        from lite.model.quantize import plan_model
        from quant import quantize_linear_from_weight as qlw
        plan = plan_model(model, policy)
        for pname, p in plan.items():
            mod = model.get_submodule(pname)
            if p.kind != "linear" or mod.weight.device.type == "meta":
                continue
            parent, _, attr = pname.rpartition(".")
            setattr(model.get_submodule(parent), attr, qlw(mod.weight, mod.bias, p.spec, "cpu"))
        real = make_sizeof(model, policy)
        for label, get in (("llm.model.layers.0", lambda m: m.llm.model.layers[0]),
                           ("yak.double_blocks.0", lambda m: m.visual_generator.backbone.double_blocks[0]),
                           ("yak.single_blocks.0", lambda m: m.visual_generator.backbone.single_blocks[0]),
                           ("vision.blocks.0", lambda m: m.visual_tokenizer.backbone.trunk.blocks[0])):
            predicted, got = sizeof(get(meta)), real(get(model))
            out["cross_check"].append({"policy": name, "block": label, "predicted": predicted, "real": got,
                                       "equal": predicted == got})
        del model, meta
    del quantize_model
    return out


def _psnr(a, b) -> float:
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255 ** 2 / mse)


@torch.no_grad()
def _llm_yak_metrics(ref, model, tokens: int, img_tokens: int, seed: int = 0) -> dict:
    from lite.model.latents import image_ids

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ref.config.vocab_size, (tokens,), generator=g)
    out = {}
    conds, tops = [], []
    for m in (ref, model):
        emb = m.llm.get_input_embeddings()(ids)[None]
        conds.append(m.condition(emb).float())
        tops.append(m.llm(inputs_embeds=emb, use_cache=False).logits.argmax(-1))
    out["llm_condition_cos"] = round(torch.nn.functional.cosine_similarity(conds[0].flatten(), conds[1].flatten(),
                                                                          dim=0).item(), 5)
    out["next_token_top1"] = round((tops[0] == tops[1]).float().mean().item(), 4)
    yak_cfg = ref.visual_generator.backbone.config
    side = int(math.isqrt(img_tokens))
    txt = (torch.randn(1, 24, yak_cfg.context_in_dim, generator=g) * 0.5).to(torch.bfloat16)
    img = torch.randn(1, side * side, 16, generator=g).to(torch.bfloat16)
    iid = image_ids(side, side)
    iid = iid[None] if iid.dim() == 2 else iid
    t = torch.full((1,), 0.6, dtype=torch.bfloat16)
    vs = [m.visual_generator.backbone(img, iid, m.visual_generator.backbone.refine(txt), t).float() for m in (ref, model)]
    out["yak_velocity_relerr"] = round(((vs[1] - vs[0]).norm() / vs[0].norm()).item(), 5)
    return out


def _tiny_fidelity(policies: tuple[str, ...]) -> dict:
    import tempfile

    from lite.model.checkpoint import load_model
    from lite.model.load_quantized import load_quantized_model
    from lite.model.precision import policy_for
    from lite.model.tiny import make_tiny

    rows: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny(Path(tmp) / "tiny", seed=0)
        ref, _ = load_model(path, dtype=policy_for("reference").dtype_for, progress=False)
        pipe = None
        try:
            from lite.runtime.pipeline import OvisPipeline

            pipe = OvisPipeline.from_pretrained(path, device="cpu", dtype=torch.bfloat16, progress=False)
            pipe.model = ref
            ref_img = pipe.generate("a red cat", width=256, height=256, steps=4, seed=3).image
        except Exception as exc:  # noqa: BLE001 - the pipeline is edited elsewhere; report, do not die
            rows["psnr_error"] = f"{type(exc).__name__}: {exc}"
            pipe = None
        for name in policies:
            model, _ = load_quantized_model(path, policy_for(name, "cpu"), progress=False)
            row = _llm_yak_metrics(ref, model, tokens=32, img_tokens=256)
            if pipe is not None:
                pipe.model = model
                row["image_psnr_db"] = round(_psnr(ref_img, pipe.generate("a red cat", width=256, height=256,
                                                                          steps=4, seed=3).image), 2)
                pipe.model = ref
            rows[name] = row
    return rows


@torch.no_grad()
def _full_width_fidelity(policies: tuple[str, ...], llm_layers: int, yak_double: int, yak_single: int) -> dict:
    """Full-width random weights (lite.model.tiny.randomize_ scales), reduced depth, bf16 reference."""
    import copy

    from lite.model.sizes import meta_model
    from lite.model.precision import policy_for
    from lite.model.quantize import quantize_model
    from lite.model.tiny import randomize_

    cfg = _shallow(_full_config(), llm_layers, yak_double, yak_single)
    t0 = time.perf_counter()
    ref = meta_model(cfg)
    ref.llm.to_empty(device="cpu")  # vision and VTE stay on meta: not measured here
    ref.visual_generator.backbone.to_empty(device="cpu")
    ref.visual_generator.vae = torch.nn.Identity()  # not used here
    for part in (ref.llm, ref.visual_generator.backbone):
        randomize_(part, 0)
    ref.llm.model.embed_tokens.weight.data.mul_(0.05 / 0.5)  # Qwen-like embedding scale
    ref.to(torch.bfloat16)
    from lite.model.checkpoint import init_non_persistent_buffers, tie_weights

    tie_weights(ref)
    init_non_persistent_buffers(ref, torch.device("cpu"))
    ref.eval()
    rows: dict = {"config": {"llm_layers": llm_layers, "yak_double": yak_double, "yak_single": yak_single,
                             "build_s": round(time.perf_counter() - t0, 1)}}
    for name in policies:
        policy = policy_for(name, "cpu")
        model = copy.deepcopy(ref)
        policy = policy.override(vision="none", visual_head="none", vte="none")
        t1 = time.perf_counter()
        quantize_model(model, policy, cast=False)
        row = _llm_yak_metrics(ref, model, tokens=64, img_tokens=1024)
        row["seconds"] = round(time.perf_counter() - t1, 1)
        rows[name] = row
        del model
    return rows


def bench_fidelity(args: argparse.Namespace) -> dict:
    pols = ("balanced", "low", "tiny", "minimal", "cpu")
    return {"tiny": _tiny_fidelity(pols),
            "full_width": _full_width_fidelity(("balanced", "low", "tiny", "cpu"), args.llm_layers,
                                               args.yak_double, args.yak_single)}


_LOAD_SCRIPT = """
import json, sys, threading, time
import torch
torch.set_num_threads(2)
from lite.memory import rss_anon_bytes, trim_host_heap
from lite.model.load_quantized import load_quantized_model
import optimum.quanto.tensor  # imported before the baseline
trim_host_heap()
base = rss_anon_bytes(); peak = [base]; stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss_anon_bytes()); time.sleep(0.005)
th = threading.Thread(target=sample); th.start()
t0 = time.perf_counter()
model, r = load_quantized_model(sys.argv[1], sys.argv[2], device="cpu", progress=False)
secs = time.perf_counter() - t0
stop.set(); th.join()
trim_host_heap()
print(json.dumps({"policy": sys.argv[2], "seconds": round(secs, 1), "baseline_rss_anon": base,
                  "peak_rss_anon": peak[0], "peak_delta": peak[0] - base, "after_rss_anon": rss_anon_bytes(),
                  "model_bytes": sum(r.component_bytes.values()), "component_bytes": r.component_bytes,
                  "largest_tensor_bytes": r.largest_tensor_bytes, "bytes_read": r.bytes_read,
                  "formats": r.quant.formats()}))
"""


def bench_load(args: argparse.Namespace) -> dict:
    from lite.errors import CheckpointError
    from lite.model.shards import index_checkpoint

    path = Path(args.full_dir)
    try:
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path}/config.json missing")
        entries = index_checkpoint(path)
    except CheckpointError as exc:
        return {"skipped": f"no complete full-size checkpoint at {path} ({exc}); write it with scripts/write_fullsize.py"}
    bf16 = sum(math.prod(e.shape) * 2 for e in entries.values())
    res = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(path), args.load_policy], capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if res.returncode != 0:
        return {"error": res.stderr[-1500:]}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["checkpoint_bf16_bytes"] = bf16
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--sections", default="linear", help="comma-separated: linear,bytes,fidelity,load (or all)")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--shapes", default="4096x4096,6144x2048", help="comma-separated OUTxIN")
    ap.add_argument("--full-dir", default="/tmp/ovis-lite-full", help="full-size checkpoint for the load section")
    ap.add_argument("--load-policy", default="balanced")
    ap.add_argument("--llm-layers", type=int, default=4, help="full-width fidelity: LLM decoder layers")
    ap.add_argument("--yak-double", type=int, default=2, help="full-width fidelity: Yak double blocks")
    ap.add_argument("--yak-single", type=int, default=4, help="full-width fidelity: Yak single blocks")
    args = ap.parse_args()
    sections = ["linear", "bytes", "fidelity", "load"] if args.sections == "all" else args.sections.split(",")
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "cuda": torch.cuda.is_available(), "torch": torch.__version__}
    result: dict = {"machine": machine}
    rows: list[dict] = []
    for section in sections:
        t0 = time.perf_counter()
        if section == "linear":
            rows = result["results"] = bench_linear(args)
        elif section == "bytes":
            result["bytes"] = bench_bytes()
        elif section == "fidelity":
            result["fidelity"] = bench_fidelity(args)
        elif section == "load":
            result["load"] = bench_load(args)
        else:
            raise SystemExit(f"unknown section {section!r}")
        result.setdefault("section_seconds", {})[section] = round(time.perf_counter() - t0, 1)
    if args.json or sections != ["linear"]:
        print(json.dumps(result, indent=1))
        return
    print(f"machine: {machine}")
    print(f"{'shape':>10} {'case':<13} {'fmt':>5} {'backend':>7} {'bytes':>12} {'=layout':>7} {'vs bf16':>7} "
          f"{'relerr':>8} {'M=1 ms':>8} {'M=256 ms':>9} {'quant ms':>9}")
    for r in rows:
        print(f"{r['shape']:>10} {r['case']:<13} {r['format']:>5} {r['backend']:>7} {r['bytes']:>12,} "
              f"{str(r['bytes'] == r['layout_bytes']):>7} {r['bytes_vs_bf16']:>7.3f} {r['relerr']:>8.4f} "
              f"{r['ms_m1']:>8.2f} {r['ms_m256']:>9.2f} {r['quantize_ms']:>9.1f}")


if __name__ == "__main__":
    main()
