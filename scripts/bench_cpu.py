"""The CPU path against the machine's own limits, measured in one process, interleaved.

Prints one JSON line: the instruction set, the compute dtype and kernel chosen per component, and
fractions of the limits, each for "before" (bf16 compute, quanto int4: the old `cpu` preset) and
"after" (the CPU plan of this machine, `lite/runtime/cpu/plan.py`: its compute dtype, packed Linears and one-row
kernel, torch-native packed kernels); the plan itself is printed as `cpu_plan`:

- yak_fraction_of_gemm: a full-width Yak pass (random full-size weights) against the time the GEMM
  rate of its own dtype needs for the same GEMM shapes (each shape timed alone, same dtype): its
  Linears and its attention's q k^T and p v per head (`fraction_of_linear_gemm`: the Linears alone);
- prefill_fraction_of_gemm: LLM (256 tokens; Linears) and ViT (1024 patches) prefill, the same way;
- decode_fraction_of_bandwidth: (weight bytes read per token / measured copy bandwidth) / token time;
- vae_fraction_of_conv: a VAE decode against its convolutions timed alone.
`--quick` cuts the depth (Yak 1+2 blocks, LLM 4 layers, ViT 2 layers); widths are always full.
`--emulate-avx2` re-runs itself with ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2 and
MKL_ENABLE_INSTRUCTIONS=AVX2: the AVX2-only code path (no AVX-512, no native bf16) on a newer CPU.
`--load` adds loading ratios against reading the same bytes from the page cache.

    python scripts/bench_cpu.py --quick --json
    python scripts/bench_cpu.py --quick --json --emulate-avx2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


if "--emulate-avx2" in sys.argv and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
    argv = [a for a in sys.argv if a != "--emulate-avx2"]
    sys.exit(subprocess.run([sys.executable, *argv, "--emulated"], env={**os.environ, **AVX2_ENV}).returncode)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lite.runtime.cpu.threads import early_environment  # noqa: E402  (imports no torch)

os.environ.update(early_environment())  # the OpenMP wait policy the CLI would choose here, before torch starts

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from lite.runtime import hardware as hw  # noqa: E402
from lite.runtime.cpu.compute import use_fp32_compute  # noqa: E402
from lite.runtime.cpu.install import runs_on_one_row  # noqa: E402
from lite.runtime.cpu.plan import CpuPlan  # noqa: E402
from lite.runtime.cpu.prepack import use_packed_linears  # noqa: E402
from lite.runtime.cpu.probes import this_machine_plan  # noqa: E402
from lite.runtime.cpu.row_gemv import use_row_gemv  # noqa: E402
from lite.runtime.cpu.threads import configure_threads  # noqa: E402
from lite.runtime.decode_threads import CoreWindow  # noqa: E402
from offload.accounting import module_nbytes  # noqa: E402
from quant import QuantSpec, quantize  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "lite" / "data" / "config.json"


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - t0


def randomize(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Full-size random weights, fast (normal_ in place, no nn.init), in `dtype`."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02, generator=g)
            else:
                p.normal_(0, 0.02, generator=g).add_(1.0)
    return module.to(dtype)


# --------------------------------------------------------------------------------------------- GEMM limits

def record_linear_shapes(module: nn.Module, run: Callable[[], object]) -> list[tuple[int, int, int]]:
    shapes: list[tuple[int, int, int]] = []

    from lite.model.modeling_aimv2 import PatchProjection

    def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        if isinstance(mod, PatchProjection):  # the ViT's patch conv runs as a [N, C p p] @ [C p p, O] GEMM
            k = mod.weight[0].numel()
            shapes.append((x.numel() // k, k, mod.out_channels))
            return
        shapes.append((x.numel() // mod.in_features, mod.in_features, mod.out_features))

    handles = [m.register_forward_pre_hook(hook) for m in module.modules()
               if (isinstance(m, PatchProjection) or hasattr(m, "in_features") and hasattr(m, "out_features"))
               and not list(m.children())]
    with torch.no_grad():
        run()
    for h in handles:
        h.remove()
    return shapes


def record_attention_shapes(run: Callable[[], object]) -> list[tuple[int, int, int]]:
    """The two GEMMs (q k^T, then p v) of every unmasked, non-causal SDPA call, as (m, k, n) per head.

    Attention is part of a block's own GEMM work: at 1024 ViT patches it is 14% of the FLOPs, so a limit
    made of the Linears alone cannot be reached even by a perfect implementation. (Causal or masked calls,
    the LLM's, are left out: their work is not a plain GEMM.)
    """
    shapes: list[tuple[int, int, int]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
            is_causal: bool = False, **kw: Any) -> torch.Tensor:
        if attn_mask is None and not is_causal:
            heads = q.numel() // (q.shape[-2] * q.shape[-1])
            shapes.extend([(q.shape[-2], q.shape[-1], k.shape[-2]), (q.shape[-2], k.shape[-2], v.shape[-1])] * heads)
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    F.scaled_dot_product_attention = spy  # type: ignore[assignment]
    try:
        with torch.no_grad():
            run()
    finally:
        F.scaled_dot_product_attention = sdpa  # type: ignore[assignment]
    return shapes


def limit_cases(shapes: list[tuple[int, int, int]], attention: list[tuple[int, int, int]]) -> dict[str, Callable[[], float]]:
    """Interleavable GEMM-limit cases: Linears and attention GEMMs, each in bf16 and fp32."""
    cases: dict[str, Callable[[], float]] = {}
    for d, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        cases[f"gemm_{tag}"] = GemmLimit(shapes, d).seconds
        if attention:
            cases[f"attn_{tag}"] = GemmLimit(attention, d).seconds
    return cases


def fractions(m: dict[str, float], compute: torch.dtype) -> dict[str, dict[str, float]]:
    """Before (bf16) and after (`compute`): against all own GEMMs (Linears + attention) and the Linears alone."""
    own = {"before": "bf16", "after": "bf16" if compute == torch.bfloat16 else "fp32"}
    return {"fraction_of_gemm": {k: (m[f"gemm_{d}"] + m.get(f"attn_{d}", 0.0)) / m[k] for k, d in own.items()},
            "fraction_of_linear_gemm": {k: m[f"gemm_{d}"] / m[k] for k, d in own.items()}}


class GemmLimit:
    """Seconds a plain F.linear in `dtype` needs for a list of shapes (each shape's operands made once)."""

    def __init__(self, shapes: list[tuple[int, int, int]], dtype: torch.dtype) -> None:
        self.counts: dict[tuple[int, int, int], int] = {}
        for s in shapes:
            self.counts[s] = self.counts.get(s, 0) + 1
        self.ops = {s: (torch.randn(s[0], s[1], dtype=dtype), torch.randn(s[2], s[1], dtype=dtype)) for s in self.counts}
        self.flops = sum(2 * m * k * n * c for (m, k, n), c in self.counts.items())

    def seconds(self) -> float:
        total = 0.0
        with torch.no_grad():
            for s, (x, w) in self.ops.items():
                F.linear(x, w)
                total += timed(lambda: F.linear(x, w)) * self.counts[s]
        return total


def interleave(cases: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median of each case over `rounds`, cases alternating within every round."""
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            samples[k].append(fn())
    return {k: median(v) for k, v in samples.items()}


# --------------------------------------------------------------------------------------------- components

def as_runtime_packs(model: nn.Module, component: str, plan: CpuPlan) -> nn.Module:
    """A copy of `model` with its token-wise bf16 weights in oneDNN's layout, as the CPU plan has the pipeline set
    it up (`lite/runtime/cpu/install.py`); the model itself where the plan does not pack it."""
    if plan.compute_dtype != torch.bfloat16 or component not in plan.packed_components:
        return model
    packed = copy.deepcopy(model)
    use_packed_linears(packed, lambda name: runs_on_one_row(component, name), native=plan.native_bf16)
    return packed


def yak_section(cfg: Any, quick: bool, plan: CpuPlan, rounds: int, res: int) -> dict[str, Any]:
    compute = plan.compute_dtype
    from lite.model.modeling_yak import RefinedText, YakTransformer

    ycfg = replace(cfg.yak, depth=1, depth_single_blocks=2) if quick else cfg.yak
    with torch.device("meta"):
        yak = YakTransformer(ycfg)
    yak = randomize(yak.to_empty(device="cpu"), torch.bfloat16).eval()
    side = res // 16  # VAE /8, then 2x2 patches
    n = side * side
    img = torch.randn(1, n, ycfg.in_channels)
    ids = torch.zeros(1, n, 3)
    ids[0, :, 1] = torch.arange(side).repeat_interleave(side).float()
    ids[0, :, 2] = torch.arange(side).repeat(side).float()
    txt_in = yak.txt_in.input_embedder.in_features
    txt = torch.randn(1, 64, txt_in)
    t = torch.tensor([0.5])

    def run(model: nn.Module, dtype: torch.dtype) -> Callable[[], object]:
        def go() -> object:
            text = model.refine(txt.to(dtype))
            return model(img.to(dtype), ids, RefinedText(text.txt_fea.to(dtype), text.y.to(dtype)), t.to(dtype))
        return go

    shapes = record_linear_shapes(yak, run(yak, torch.bfloat16))
    attention = record_attention_shapes(run(yak, torch.bfloat16))

    def before() -> float:
        return timed(run(yak, torch.bfloat16))

    packed = as_runtime_packs(yak, "yak", plan)

    def after() -> float:
        if compute == torch.bfloat16:
            return timed(run(packed, torch.bfloat16))
        with use_fp32_compute(yak):
            return timed(run(yak, torch.float32))

    m = interleave({"before": before, "after": after, **limit_cases(shapes, attention)}, rounds)
    return {"resolution": res, "tokens": n + 64, "blocks": [ycfg.depth, ycfg.depth_single_blocks],
            "seconds": {"before": m["before"], "after": m["after"]},
            "gemm_seconds": {"bf16": m["gemm_bf16"], "fp32": m["gemm_fp32"]},
            "attention_gemm_seconds": {"bf16": m["attn_bf16"], "fp32": m["attn_fp32"]}, **fractions(m, compute),
            "after_vs_fp32_gemm": m["gemm_fp32"] / m["after"], "speedup": m["before"] / m["after"]}


def vit_section(cfg: Any, quick: bool, compute: torch.dtype, rounds: int) -> dict[str, Any]:
    from lite.model.modeling_aimv2 import AIMv2Model

    vcfg = replace(cfg.vision, num_hidden_layers=2) if quick else cfg.vision
    with torch.device("meta"):
        vit = AIMv2Model(vcfg)
    vit = randomize(vit.to_empty(device="cpu"), torch.bfloat16).eval()
    grid = torch.tensor([[1, 32, 32]])
    px = torch.randn(32 * 32, vcfg.num_channels * vcfg.patch_size ** 2)

    def run(dtype: torch.dtype) -> Callable[[], object]:
        return lambda: vit(px.to(dtype), grid)

    shapes = record_linear_shapes(vit, run(torch.bfloat16))
    attention = record_attention_shapes(run(torch.bfloat16))

    def after() -> float:  # unpacked, as in the runtime: a checkpoint's bf16 ViT is memory-mapped (lite/runtime/cpu/prepack.py)
        if compute == torch.bfloat16:
            return timed(run(torch.bfloat16))
        with use_fp32_compute(vit):
            return timed(run(torch.float32))

    m = interleave({"before": lambda: timed(run(torch.bfloat16)), "after": after,
                    **limit_cases(shapes, attention)}, rounds)
    return {"patches": 1024, "layers": vcfg.num_hidden_layers, "seconds": {"before": m["before"], "after": m["after"]},
            "gemm_seconds": {"bf16": m["gemm_bf16"], "fp32": m["gemm_fp32"]},
            "attention_gemm_seconds": {"bf16": m["attn_bf16"], "fp32": m["attn_fp32"]}, **fractions(m, compute),
            "speedup": m["before"] / m["after"]}


def _qwen(cfg: Any, layers: int) -> nn.Module:
    from transformers import Qwen3ForCausalLM
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    qcfg = cfg.qwen3_config()
    qcfg.num_hidden_layers = layers
    with torch.device("meta"):
        model = Qwen3ForCausalLM(qcfg)
    model = randomize(model.to_empty(device="cpu"), torch.bfloat16).eval()
    model.model.rotary_emb = Qwen3RotaryEmbedding(config=qcfg)  # its buffers were not real on meta
    model.tie_weights()
    return model


def _dense_llm_shapes(cfg: Any, prompt: torch.Tensor, layers: int) -> list[tuple[int, int, int]]:
    """The Linear shapes of one dense decoder layer at this prompt, times `layers`, plus the head's one row."""
    dense = _qwen(cfg, 1)
    shapes = record_linear_shapes(dense.model.layers, lambda: dense(prompt))
    return shapes * layers + [(1, dense.lm_head.in_features, dense.lm_head.out_features)]


def llm_section(cfg: Any, quick: bool, plan: CpuPlan, rounds: int, bandwidth: float) -> dict[str, Any]:
    compute = plan.compute_dtype
    from transformers import DynamicCache

    layers = 4 if quick else int(cfg.llm["num_hidden_layers"])
    out: dict[str, Any] = {"layers": layers}
    models: dict[str, nn.Module] = {}
    quant_s_per_gb: dict[str, float] = {}
    for label, backend, cd in (("before", "quanto", torch.bfloat16), ("after", "native", compute)):
        model = _qwen(cfg, layers)
        if backend == "native":
            from quant.backends import REGISTRY, torch_native

            REGISTRY.setdefault(torch_native.name, torch_native)  # until the lead registers it
        spec = QuantSpec("int4", backend=backend, compute_dtype=cd)
        bf16_bytes = module_nbytes(model.model.layers)
        t0 = time.perf_counter()
        quantize(model.model.layers, spec)
        quant_s_per_gb[label] = (time.perf_counter() - t0) / (bf16_bytes / 1e9)
        if backend == "native":
            use_row_gemv(model, kernel=plan.one_row_kernel.value)  # as the runtime does on CPU (the head's decode GEMV)
        models[label] = model
    fp32_handle = use_fp32_compute(models["after"]) if compute == torch.float32 else None
    prompt = torch.randint(0, 1000, (1, 256))
    shapes = _dense_llm_shapes(cfg, prompt, layers)
    lim = {d: GemmLimit(shapes, d) for d in (torch.bfloat16, torch.float32)}

    def prefill(label: str) -> Callable[[], float]:
        # as the runtime's generate() runs it: logits for the last position only
        return lambda: timed(lambda: models[label](prompt, use_cache=False, logits_to_keep=1))

    caches: dict[str, Any] = {}
    for label, model in models.items():
        with torch.no_grad():
            cache = DynamicCache()
            model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        caches[label] = cache

    chosen: list[int] = []

    def decode(label: str) -> Callable[[], float]:
        def go() -> float:
            cache = caches[label]
            extra = cache.get_seq_length() - 256
            if extra > 0:
                cache.crop(-extra)
            tok = torch.randint(0, 1000, (1, 1))
            before = torch.get_num_threads()  # as the runtime's decode: threads per call from the load now
            chosen.append(CoreWindow.start().decode_threads(before)[0])
            torch.set_num_threads(chosen[-1])
            try:
                return timed(lambda: models[label](tok, past_key_values=cache, use_cache=True))
            finally:
                torch.set_num_threads(before)
        return go

    m = interleave({"prefill_before": prefill("before"), "prefill_after": prefill("after"),
                    "decode_before": decode("before"), "decode_after": decode("after"),
                    "gemm_bf16": lim[torch.bfloat16].seconds, "gemm_fp32": lim[torch.float32].seconds}, rounds)
    per_token = {k: module_nbytes(models[k].model.layers) + module_nbytes(models[k].model.norm)
                 + module_nbytes(models[k].lm_head) for k in models}
    own_after = m["gemm_bf16"] if compute == torch.bfloat16 else m["gemm_fp32"]
    out.update({
        "quantize_s_per_gb": quant_s_per_gb,
        "prefill_seconds": {"before": m["prefill_before"], "after": m["prefill_after"]},
        "prefill_fraction_of_gemm": {"before": m["gemm_bf16"] / m["prefill_before"],
                                     "after": own_after / m["prefill_after"]},
        "decode_ms": {"before": m["decode_before"] * 1e3, "after": m["decode_after"] * 1e3},
        "decode_bytes_per_token": per_token,
        "decode_fraction_of_bandwidth": {k: per_token[k] / (bandwidth * 1e9) / m[f"decode_{k}"] for k in models},
        "decode_threads": sorted(set(chosen)),  # the counts the per-call choice took during the measurement
    })
    if fp32_handle is not None:
        fp32_handle.remove()
    return out


def vae_section(cfg: Any, rounds: int, res: int) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_config(cfg.vae).float().eval()
    randomize(vae, torch.float32)
    z = torch.randn(1, vae.config.latent_channels, res // 8, res // 8)
    convs: list[tuple[torch.Tensor, nn.Conv2d]] = []

    def hook(mod: nn.Conv2d, args: tuple[Any, ...]) -> None:
        convs.append((torch.randn_like(args[0]), mod))

    handles = [m.register_forward_pre_hook(hook) for m in vae.decoder.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        vae.decode(z)
    for h in handles:
        h.remove()

    def conv_limit() -> float:
        total = 0.0
        with torch.no_grad():
            for x, mod in convs:
                total += timed(lambda: mod._conv_forward(x, mod.weight, mod.bias))
        return total

    m = interleave({"decode": lambda: timed(lambda: vae.decode(z)), "conv": conv_limit}, rounds)
    return {"resolution": res, "dtype": "float32", "seconds": m["decode"], "conv_seconds": m["conv"],
            "fraction_of_conv": m["conv"] / m["decode"]}


def load_section(cfg: Any, layers: int, rounds: int) -> dict[str, Any]:
    """Streaming quantized load (quanto vs native) and a pre-quantized native load, against a page-cache read."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from quant import export_quantized, restore_quantized
    from quant.backends import REGISTRY, torch_native
    from quant.linear import quantize_linear_from_weight

    REGISTRY.setdefault(torch_native.name, torch_native)
    model = _qwen(cfg, layers)
    tmp = Path(tempfile.mkdtemp(prefix="bench_cpu_"))
    src = tmp / "bf16.safetensors"
    save_file({k: v.contiguous() for k, v in model.model.layers.state_dict().items()}, src)
    del model

    def read(path: Path) -> float:
        size = path.stat().st_size
        buf = bytearray(size)
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as fh:
            view = memoryview(buf)
            got = 0
            while got < size:
                got += fh.readinto(view[got:])
        return time.perf_counter() - t0

    def stream(backend: str, write: Path | None = None) -> float:
        """A streaming quantized load; with `write`, what `ovis-lite quantize` does: the same, then export and save."""
        spec = QuantSpec("int4", backend=backend)
        layers = nn.ModuleDict()
        t0 = time.perf_counter()
        with safe_open(src, "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if key.endswith(".weight") and t.dim() == 2:
                    layers[key.replace(".", "_")] = quantize_linear_from_weight(t, None, spec)
        if write is not None:
            tensors, _ = export_quantized(layers)
            save_file({k: v.contiguous() for k, v in tensors.items()}, write)
        seconds = time.perf_counter() - t0
        if write is not None:
            write.unlink()
        return seconds

    skeleton = _qwen(cfg, layers)
    quantize(skeleton.model.layers, QuantSpec("int4", backend="native"))
    tensors, entries = export_quantized(skeleton.model.layers)
    pre = tmp / "native.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, pre)
    del skeleton, tensors

    def prequantized() -> float:
        target = _qwen(cfg, layers).model.layers
        t0 = time.perf_counter()
        restore_quantized(target, load_file(pre), entries)
        return time.perf_counter() - t0

    src_bytes = src.stat().st_size
    read(src), read(pre)  # into the page cache
    m = interleave({"read_bf16": lambda: read(src), "stream_quanto": lambda: stream("quanto"),
                    "stream_native": lambda: stream("native"), "read_pre": lambda: read(pre),
                    "quantize_native": lambda: stream("native", tmp / "quantized.safetensors"),
                    "prequantized_native": prequantized}, rounds)
    for p in (src, pre):
        p.unlink()
    tmp.rmdir()
    return {"layers": layers, "bf16_file_bytes": src_bytes, "seconds": m,
            "stream_ratio_to_read": {"quanto": m["stream_quanto"] / m["read_bf16"],
                                     "native": m["stream_native"] / m["read_bf16"]},
            "prequantized_ratio_to_read": m["prequantized_native"] / m["read_pre"],
            "quantize_ratio_to_stream": m["quantize_native"] / m["stream_native"]}


def kernels_section(rounds: int, compute: torch.dtype) -> dict[str, Any]:
    """One [6144, 2048] weight (the LLM's MLP) per backend: bytes, error vs fp32, ms at M=1 and M=256."""
    from quant.backends import REGISTRY, torch_native
    from quant.linear import quantize_linear_from_weight

    REGISTRY.setdefault(torch_native.name, torch_native)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(6144, 2048, generator=g) * 0.02).to(torch.bfloat16)
    x1, x256 = torch.randn(1, 2048, generator=g), torch.randn(256, 2048, generator=g)
    ref = x256 @ w.float().t()
    layers: dict[str, nn.Module] = {}
    dense = {"fp32 GEMM": nn.Linear(2048, 6144, bias=False), "bf16 GEMM": nn.Linear(2048, 6144, bias=False)}
    with torch.no_grad():
        dense["fp32 GEMM"].weight.copy_(w.float())
        dense["bf16 GEMM"] = dense["bf16 GEMM"].to(torch.bfloat16)
        dense["bf16 GEMM"].weight.copy_(w)
    dense["bf16, one row as torch.mv"] = copy.deepcopy(dense["bf16 GEMM"])
    use_row_gemv(dense["bf16, one row as torch.mv"], kernel="mv")
    dense["bf16, one row, ATen mv"] = copy.deepcopy(dense["bf16 GEMM"])
    use_row_gemv(dense["bf16, one row, ATen mv"], kernel="mv-aten")
    if this_machine_plan().packed_components:  # the Yak's token-wise layers on this CPU (lite/runtime/cpu/prepack.py)
        dense["bf16, oneDNN-packed weight"] = copy.deepcopy(dense["bf16 GEMM"])
        use_packed_linears(dense["bf16, oneDNN-packed weight"])
    layers.update(dense)
    for label, spec in (("quanto int4 g128", QuantSpec("int4", backend="quanto")),
                        ("quanto int8", QuantSpec("int8", backend="quanto")),
                        ("bnb nf4", QuantSpec("nf4", backend="bnb")),
                        ("torch int8", QuantSpec("int8", backend="torch")),
                        ("native int4 g128", QuantSpec("int4", backend="native")),
                        ("native int8", QuantSpec("int8", backend="native"))):
        try:
            layers[label] = quantize_linear_from_weight(w, None, spec, "cpu", torch.bfloat16)
        except Exception as exc:  # a backend missing here: say so in the table
            layers[label] = exc  # type: ignore[assignment]
    out: dict[str, Any] = {}
    for label, layer in layers.items():
        if isinstance(layer, Exception):
            out[label] = {"error": f"{type(layer).__name__}: {layer}"[:120]}
            continue
        dt = torch.float32 if label == "fp32 GEMM" else torch.bfloat16
        with torch.no_grad():
            y = layer(x256.to(dt)).float()
        out[label] = {"bytes": module_nbytes(layer), "relerr_vs_fp32": ((y - ref).norm() / ref.norm()).item(),
                      "activations": str(dt).removeprefix("torch.")}
    cases: dict[str, Callable[[], float]] = {}
    for label, layer in layers.items():
        if isinstance(layer, Exception):
            continue
        dt = torch.float32 if label == "fp32 GEMM" else torch.bfloat16
        a1, a256 = x1.to(dt), x256.to(dt)
        cases[f"{label}|1"] = (lambda layer=layer, a=a1: timed(lambda: layer(a)))
        cases[f"{label}|256"] = (lambda layer=layer, a=a256: timed(lambda: layer(a)))
    for fn in cases.values():
        fn()
    m = interleave(cases, rounds)
    for key, sec in m.items():
        label, rows = key.split("|")
        out[label][f"ms_m{rows}"] = sec * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced depth (full width)")
    ap.add_argument("--json", action="store_true", help="one JSON line")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="yak,vit,llm,vae", help="comma-separated sections: yak, vit, llm, vae, kernels")
    ap.add_argument("--load", action="store_true", help="also loading ratios (writes a temporary file)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--emulated", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    configure_threads(args.threads)
    feats = hw.with_bandwidth()
    plan = this_machine_plan()  # what the runtime would run here, decided once
    compute, why = plan.compute_dtype, plan.compute.reason
    from lite.model.config import parse_config

    cfg = parse_config(json.loads(CONFIG.read_text()), str(CONFIG))
    only = set(args.only.split(","))
    packed = ", oneDNN-packed weights" if compute == torch.bfloat16 and plan.packed_components else ""
    result: dict[str, Any] = {
        "machine": feats.to_dict(), "describe": feats.describe(), "emulated_avx2": args.emulated,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "openmp_wait": plan.wait_policy.reason,
        "one_row_bf16_kernel": plan.one_row_kernel.value, "quick": args.quick, "cpu_plan": plan.to_dict(),
        "compute_dtype": str(compute).removeprefix("torch."), "why": why,
        "kernels": {"llm": "native int4 (torch._weight_int4pack_mm_for_cpu, bf16 activations; dense GEMM over "
                           "dequantized weights above 128 rows)",
                    "yak": f"dense, bf16 storage, {str(compute).removeprefix('torch.')} compute{packed}",
                    "vit": f"dense, bf16 storage, {str(compute).removeprefix('torch.')} compute",
                    "vae": "dense fp32"},
        "before": "bf16 compute, quanto int4 LLM",
    }
    if "yak" in only:
        result["yak"] = yak_section(cfg, args.quick, plan, args.rounds, 256)
        result["yak_fraction_of_gemm"] = result["yak"]["fraction_of_gemm"]
    if "vit" in only:
        result["vit"] = vit_section(cfg, args.quick, compute, args.rounds)
    if "llm" in only:
        result["llm"] = llm_section(cfg, args.quick, plan, args.rounds, feats.bandwidth_gbs or 1.0)
        result["decode_fraction_of_bandwidth"] = result["llm"]["decode_fraction_of_bandwidth"]
    if "vit" in only or "llm" in only:
        result["prefill_fraction_of_gemm"] = {
            k: v["fraction_of_gemm"] if k == "vit" else v["prefill_fraction_of_gemm"]
            for k, v in (("llm", result.get("llm")), ("vit", result.get("vit"))) if v is not None}
    if "vae" in only:
        result["vae"] = vae_section(cfg, args.rounds, 256 if args.quick else 512)
        result["vae_fraction_of_conv"] = result["vae"]["fraction_of_conv"]
    if "kernels" in only:
        result["kernels_6144x2048"] = kernels_section(max(args.rounds, 5), compute)
    if args.load:
        result["load"] = load_section(cfg, 4 if args.quick else 8, args.rounds)
    print("\n".join(plan.describe()), file=sys.stderr)  # the plan these numbers ran under, as the load report shows it
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
