"""How much device memory an Ovis-U1 task needs, and how to cut the model into offload units.

The planner in `offload/` is model-agnostic: it needs units (with byte sizes and the phases that use
them) and an activation estimate per phase. This module supplies both for Ovis-U1. It works on a
`meta` model, so `ovis-lite plan` answers before a single weight is read.

Activation estimates are deliberately conservative upper bounds built from the shapes of the
largest tensors alive at once in each phase (spec §6 gives the big ones: attention matrices on
math-path SDPA, the VAE's full-resolution feature maps).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from torch import nn

from offload import UnitSpec, build_units
from offload.units import Unit

from lite.model.architecture import OVIS_U1
from lite.model.config import OvisU1Config, PreprocessorConfig
from lite.model.processing import edit_output_size, smart_resize, t2i_size

if TYPE_CHECKING:
    from lite.model.modeling_ovis_u1 import OvisU1

TASKS = ("understand", "t2i", "edit")
CFG_PASSES = OVIS_U1.cfg_passes
GENERATION_PROMPT_TOKENS = 64  # the text around an image in a generation condition
UNDERSTAND_PROMPT_TOKENS = 256


@dataclass(frozen=True)
class Workload:
    """What one call will do; enough to size its activations."""

    task: str
    width: int = 1024
    height: int = 1024
    steps: int = 50
    nfe: int | None = None  # model evaluations per image; defaults to steps x CFG passes
    num_images: int = 1
    max_new_tokens: int = 1024
    device_type: str = "cuda"
    dtype_bytes: int = 2
    vae_dtype_bytes: int = 4
    vae_tile: int | None = None  # decode/encode tile side in pixels; None = untiled

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")

    @property
    def output_size(self) -> tuple[int, int]:
        """(W, H) of the generated image: floored to 16 for t2i, smart_resize(32) for edits."""
        if self.task == "edit":
            return edit_output_size(self.width, self.height)
        return t2i_size(self.width, self.height)

    @property
    def model_evaluations(self) -> int:
        return self.nfe if self.nfe is not None else self.steps * CFG_PASSES.get(self.task, 0)


def _attention_scores(heads: int, q: int, k: int, nbytes: int, device_type: str) -> int:
    """CUDA's flash / memory-efficient kernels and torch's CPU flash kernel keep one tile per block;
    MPS may take the math path, which materialises heads x q x k scores (logits and softmax)."""
    if device_type in ("cuda", "cpu"):
        return heads * q * 64 * nbytes
    return 2 * heads * q * k * nbytes


def _vision_tokens(w: int, h: int, pp: PreprocessorConfig, generation: bool) -> int:
    if generation:
        h, w = smart_resize(h, w, max_pixels=pp.min_pixels)  # factor 28 whatever the patch size (spec §4)
    h, w = smart_resize(h, w, pp.factor, pp.min_pixels, pp.max_pixels)
    return (h // pp.patch_size) * (w // pp.patch_size)


def conditions_activation(cfg: OvisU1Config, pp: PreprocessorConfig, wl: Workload) -> int:
    """ViT over the image(s), visual head in chunks, one LLM forward (all hidden states kept)."""
    b = wl.dtype_bytes
    v = cfg.vision
    if wl.task == "understand":
        patches = _vision_tokens(wl.width, wl.height, pp, generation=False)
        seq = min(cfg.multimodal_max_length, patches // 4 * wl.num_images + UNDERSTAND_PROMPT_TOKENS)
        new = wl.max_new_tokens
    else:
        w, h = wl.output_size
        patches = _vision_tokens(w, h, pp, generation=True)
        seq = patches // 4 + GENERATION_PROMPT_TOKENS
        new = 0
    vit = patches * (4 * v.hidden_size + 3 * v.intermediate_size) * b
    vit += _attention_scores(v.num_attention_heads, patches, patches, b, wl.device_type)
    head = min(512, patches // 4) * v.head_out_features * (4 + b) * 2  # fp32 softmax of a 512-row chunk
    llm = cfg.llm
    hidden, layers = int(llm["hidden_size"]), int(llm["num_hidden_layers"])
    kv_heads, head_dim = int(llm["num_key_value_heads"]), int(llm.get("head_dim", hidden // llm["num_attention_heads"]))
    states = (layers + 1) * seq * hidden * b  # output_hidden_states keeps every layer
    mlp = 3 * seq * int(llm["intermediate_size"]) * b
    kv = 2 * layers * (seq + new) * kv_heads * head_dim * b
    attn = _attention_scores(int(llm["num_attention_heads"]), seq, seq, b, wl.device_type)
    logits = int(llm["vocab_size"]) * 4 * 2
    return vit + head + states + mlp + kv + attn + logits + _int4_prefill_workspace(cfg, wl)


def _int4_prefill_workspace(cfg: OvisU1Config, wl: Workload) -> int:
    """On CPU, prefill-sized int4 calls dequantize into a kept buffer (quant/backends/int4_prefill.py):
    nibbles plus levels in the compute dtype, for the largest LLM layer (the MLP's [intermediate, hidden])."""
    if wl.device_type != "cpu":
        return 0
    return int(cfg.llm["intermediate_size"]) * int(cfg.llm["hidden_size"]) * (1 + wl.dtype_bytes)


def denoise_activation(cfg: OvisU1Config, wl: Workload) -> int:
    """One Yak pass: the widest block (single: linear1 + concat) plus attention, plus latents."""
    if wl.task == "understand":
        return 0
    y = cfg.yak
    b = wl.dtype_bytes
    w, h = wl.output_size
    target = (w // 16) * (h // 16)
    tokens = target * (2 if wl.task == "edit" else 1) + GENERATION_PROMPT_TOKENS + 300
    widest = tokens * (3 * y.hidden_size + y.mlp_hidden) + tokens * (y.hidden_size + y.mlp_hidden)
    # x1.5: measured 93.5 MB for a full-size bf16 pass over 1324 tokens on CPU (scripts/bench_memory.py)
    per_pass = (widest + 4 * tokens * y.hidden_size) * b * 3 // 2
    per_pass += _attention_scores(y.num_heads, tokens, tokens, b, wl.device_type)
    rope = tokens * (y.head_dim // 2) * 4 * 4
    conditions = CFG_PASSES[wl.task] * (tokens * y.hidden_size * b + rope)
    latents_bytes = 8 * target * y.in_channels * 4
    return per_pass + conditions + latents_bytes


def _vae_side_activation(cfg: OvisU1Config, w: int, h: int, wl: Workload) -> int:
    channels = list(cfg.vae.get("block_out_channels", [128, 256, 512, 512]))
    b = wl.vae_dtype_bytes
    if wl.vae_tile is not None and max(w, h) > wl.vae_tile:
        w = h = wl.vae_tile
    # Six full-resolution maps of the last up block are alive at once: measured 805 MB for an fp32
    # decode at 512x512 (6 x 128 channels x 4 B per pixel; scripts/bench_memory.py).
    full = 6 * channels[0] * w * h * b
    return max(full, _mid_block_activation(channels, w, h, b, wl.device_type)) + 3 * w * h * 4


def _mid_block_activation(channels: list[int], w: int, h: int, nbytes: int, device_type: str) -> int:
    mid = (w // 8) * (h // 8)
    return _attention_scores(1, mid, mid, nbytes, device_type) + 4 * channels[-1] * mid * nbytes


#: Input rows `lite.runtime.lean_vae` convolves at once, in bytes: a strip's temporaries are a few of these.
VAE_STRIP_BYTES = 32 << 20
#: Diffusers' plain decode on a CPU, in full-resolution maps of the last up block (the 6 the estimate above
#: counts are too few there): 7.55 measured at 1024x1024 in fp32 (scripts/bench_memory.py --vae-decode).
CPU_PLAIN_DECODE_MAPS = 7.6
#: Diffusers' encode on a CPU (an edit's source), in the same maps: 5.0 measured at 1024x1024 in fp32 (its
#: widest moment holds 128-channel maps only).
CPU_PLAIN_ENCODE_MAPS = 5.0


def lean_decode_activation(channels: list[int], w: int, h: int, nbytes: int) -> int:
    """Peak of the CPU decode through `lite.runtime.lean_vae`, counted from the decoder's shapes.

    Per up block (`cin` -> `cout` channels over `p` pixels): the 1x1 shortcut runs whole, so its input, oneDNN's
    blocked copy of it and its blocked output are alive together (2 cin + cout); the strip-cut moments hold
    the block's input or normalised input, the shortcut and a convolution's output (cin + 2 cout, 3 cout) plus
    a few strips; the upsampler its input and its output at 4 p. At 1024x1024 the last block's shortcut
    (2 x 256 + 128 channels, 2.5 GiB in fp32) is the peak: 2.505 GiB measured (scripts/bench_memory.py
    --vae-decode, docs/BENCHMARKS.md "Host memory on CPU").
    """
    rev = list(reversed(channels))
    whole, cut = 0, 0
    for k, cout in enumerate(rev):
        cin = rev[k - 1] if k else rev[0]
        pixels = (w >> (len(rev) - 1 - k)) * (h >> (len(rev) - 1 - k))
        if cin != cout:
            whole = max(whole, (2 * cin + cout) * pixels)
        cut = max(cut, (cin + 2 * cout) * pixels, 3 * cout * pixels)
        if k < len(rev) - 1:
            cut = max(cut, 5 * cout * pixels)
    return max(whole * nbytes, cut * nbytes + 4 * VAE_STRIP_BYTES)


def decode_activation(cfg: OvisU1Config, wl: Workload) -> int:
    """The decode phase: the VAE decode (and an edit's encode of its source, which runs in the same units).

    On a CPU an untiled decode runs through `lite.runtime.lean_vae` (`lean_decode_activation`); a tiled one is
    diffusers' own (`CPU_PLAIN_DECODE_MAPS` per tile). The encode is diffusers' own everywhere (on a CPU,
    `CPU_PLAIN_ENCODE_MAPS` of its own side or of a tile).
    """
    if wl.task == "understand":
        return 0
    w, h = wl.output_size
    if wl.device_type != "cpu":
        return _vae_side_activation(cfg, w, h, wl)
    channels = list(cfg.vae.get("block_out_channels", [128, 256, 512, 512]))
    b, image = wl.vae_dtype_bytes, 3 * w * h * 4  # the image, in fp32 then uint8
    tiled = wl.vae_tile is not None and max(w, h) > wl.vae_tile
    if tiled:
        t = wl.vae_tile  # one tile decoded at a time; the decoded tiles and the blended image beside it
        decode = max(int(CPU_PLAIN_DECODE_MAPS * channels[0] * t * t * b),
                     _mid_block_activation(channels, t, t, b, "cpu")) + 2 * image
    else:
        decode = max(lean_decode_activation(channels, w, h, b), _mid_block_activation(channels, w, h, b, "cpu"))
        decode += image
    if wl.task != "edit":
        return decode
    pixels = wl.vae_tile ** 2 if tiled else w * h
    return max(decode, int(CPU_PLAIN_ENCODE_MAPS * channels[0] * pixels * b) + image)


# On CUDA, measured peaks (scripts/gpu_checks.sh, H100, full size, 1024^2) ran above the CPU-calibrated
# estimates: the caching allocator, cuBLAS/cuDNN workspaces and the VAE's conv intermediates add about
# 0.4 GiB per phase, and the fp32 VAE decode about 1.6x its CPU peak.
CUDA_OVERHEAD_BYTES = 384 << 20
CUDA_VAE_FACTOR = 1.6


def activation_bytes(cfg: OvisU1Config, pp: PreprocessorConfig, wl: Workload) -> dict[str, int]:
    """Estimated activation peak per phase (bytes). The edit's VAE encode runs in `decode` units."""
    act = {"conditions": conditions_activation(cfg, pp, wl), "denoise": denoise_activation(cfg, wl),
           "decode": decode_activation(cfg, wl)}
    if wl.device_type == "cuda":
        act["decode"] = int(act["decode"] * CUDA_VAE_FACTOR)
        act = {phase: (v + CUDA_OVERHEAD_BYTES if v or phase == "conditions" else 0) for phase, v in act.items()}
    return act


def unit_specs(wl: Workload, llm_group: int = 4, yak_group: int = 1) -> list[UnitSpec]:
    """Blocks of the LLM, ViT and Yak page one (group) at a time; the small pieces are whole units.

    `uses` tells the planner which units to keep resident first: the Yak blocks run
    steps x passes times, the LLM runs once per condition (or once per generated token).
    """
    gen = wl.task != "understand"
    cond_uses = CFG_PASSES.get(wl.task, 1) if gen else 1 + wl.max_new_tokens
    denoise = wl.model_evaluations if gen else 0
    vision_phase = ("conditions",)
    (llm_blocks,), (vit_blocks,), (double, single) = (OVIS_U1.block_lists[c] for c in ("llm", "vision", "yak"))
    return [
        UnitSpec("llm", llm_blocks, llm_group, ("conditions",), cond_uses),
        UnitSpec("llm", None, 1, ("conditions",), cond_uses),
        UnitSpec("vision", vit_blocks, 6, vision_phase, CFG_PASSES.get(wl.task, 1)),
        UnitSpec("vision", None, 1, vision_phase, CFG_PASSES.get(wl.task, 1)),
        UnitSpec("visual_head", None, 1, vision_phase, CFG_PASSES.get(wl.task, 1)),
        UnitSpec("vte", None, 1, ("conditions",), cond_uses),
        UnitSpec("yak", double, yak_group, ("denoise",), max(denoise, 1)),
        UnitSpec("yak", single, 3 * yak_group, ("denoise",), max(denoise, 1)),
        # The rest holds the token refiner, which runs while the conditions are built.
        UnitSpec("yak", None, 1, ("conditions", "denoise") if gen else ("denoise",), max(denoise, 1)),
        UnitSpec("vae", None, 1, ("decode",), 2 if wl.task == "edit" else 1),
    ]


#: The attribute of a planning skeleton (`lite.model.skeleton`) that keeps its cuts, per unit layout.
UNIT_CACHE_ATTR = "planning_units"


def ovis_units(model: OvisU1, wl: Workload, llm_group: int = 4, yak_group: int = 1) -> list[Unit]:
    specs = unit_specs(wl, llm_group, yak_group)
    cache = getattr(model, UNIT_CACHE_ATTR, None)
    if cache is None:
        return build_units(OVIS_U1.component_modules(model), specs)
    # A planning skeleton never changes, and only phases/uses differ between workloads: cut it once per layout
    # (the preset table plans 24 workloads; cutting was a third of its time). Spec i is built with uses=i, so
    # each unit says which spec made it.
    layout = tuple((s.component, s.path, s.group_size) for s in specs)
    if layout not in cache:
        numbered = [replace(s, phases=(), uses=i) for i, s in enumerate(specs)]
        cache[layout] = build_units(OVIS_U1.component_modules(model), numbered)
    return [replace(u, phases=frozenset(specs[u.uses].phases), uses=specs[u.uses].uses, extra={})
            for u in cache[layout]]


def resize_units(units: list[Unit], model: nn.Module, module_bytes: dict[str, int] | None) -> list[Unit]:
    """Re-size units from `module_bytes` (qualified module name -> bytes it owns, e.g. once quantized).

    Lets the planner size a quantized layout on a `meta` model, before any weight exists.
    """
    if module_bytes is None:
        return units
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for u in units:
        owners = {names.get(id(slot.module), "") for slot in u.slots}
        out.append(replace(u, nbytes=sum(module_bytes.get(name, 0) for name in owners)))
    return out
