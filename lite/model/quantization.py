"""Per-component quantization of Ovis-U1: policies, streaming quantized loading, pre-quantized checkpoints.

Built on the model-agnostic `quant` package (which never imports `lite`). Entry points:

    policy = policy_for("balanced", "cuda")            # QuantPolicy: component -> QuantSpec
    policy = policy.override(llm="int8")               # every choice can be overridden
    model, report = load_quantized_model(path, policy, device="cuda")   # streams: read -> quantize -> place
    quantize_model(model, policy)                      # same result for an already loaded model
    save_quantized_checkpoint(src, "balanced", out)    # safetensors + ovis_lite_quant.json
    load_quantized_model(out, device="cpu")            # never reads full-precision weights
    quantized_bytes(config, policy)                    # exact bytes per component on a meta model
    sizeof = make_sizeof(meta_model, policy); sizeof(meta_model.llm.model.layers[0])

Components (policy keys): llm (decoder layers), llm_embed (embed_tokens and the tied lm_head,
which shares the int8 payload), vision (AIMv2 backbone), visual_head (the 65532x4096 Linear),
vte (visual embedding table), yak (MMDiT), vae (never quantized: a storage dtype only).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from offload.accounting import module_nbytes
from quant import (Int8Embedding, LayerReport, QuantFormatError, QuantSpec, embedding_layout_nbytes,
                   export_quantized, layer_kind, layout_nbytes, quantize_linear_from_weight, quantize_rows_int8,
                   restore_quantized)
from quant import bnb_backend, quanto_backend
from quant.apply import LayerTotals
from quant.serialize import VERSION as QUANT_FORMAT_VERSION
from quant.spec import QUANT_FORMATS, dtype_from_name, dtype_name, effective_group_size

from lite.model.config import OvisU1Config, load_config
from lite.errors import CheckpointError, OutputError
from lite.model.checkpoint import (INDEX_FILE, LoadReport, find_checkpoint, index_checkpoint, init_non_persistent_buffers,
                      iter_checkpoint_tensors, set_tensor, tie_weights, validate_checkpoint)
from lite.memory import rss_anon_bytes, trim_host_heap
from lite.model.modeling_ovis_u1 import COMPONENTS, TIED_KEYS, OvisU1, component_of

# --------------------------------------------------------------------------------------------
# policies
# --------------------------------------------------------------------------------------------

#: Policy keys: the six model components plus `llm_embed` (embed_tokens + tied lm_head).
POLICY_KEYS: tuple[str, ...] = ("llm", "llm_embed", "vision", "visual_head", "vte", "yak", "vae")
#: Module (qualified name in `OvisU1`) that each policy key's include/exclude patterns are relative to.
COMPONENT_ROOTS: dict[str, str] = {
    "llm": "llm", "llm_embed": "llm", "vision": "visual_tokenizer.backbone", "visual_head": "visual_tokenizer.head",
    "vte": "vte", "yak": "visual_generator.backbone", "vae": "visual_generator.vae",
}
EMBED_NAME = "llm.model.embed_tokens"
HEAD_NAME = "llm.lm_head"
VTE_NAME = "vte"

#: LLM decoder layers only: embed_tokens/lm_head follow `llm_embed`, norms are not Linear.
LLM_INCLUDE: tuple[str, ...] = ("model.layers.*",)
#: Yak layers kept in bf16 (anchors: modulation, embedders, final layer, norms; norms are not Linear).
YAK_MODULATION: tuple[str, ...] = ("*_mod.lin", "*.modulation.lin", "*adaLN_modulation.*")
YAK_EMBEDDERS: tuple[str, ...] = ("img_in", "time_in.*", "vector_in.*", "txt_in.input_embedder", "txt_in.c_embedder.*")
YAK_FINAL: tuple[str, ...] = ("final_layer.*",)
YAK_KEEP_BF16: tuple[str, ...] = YAK_MODULATION + YAK_EMBEDDERS + YAK_FINAL
#: Formats the two table-like components accept (Int8Embedding / Int8VisualEmbedding, or a cast).
TABLE_FORMATS: tuple[str, ...] = ("int8", "bf16", "fp16", "none")
VAE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                                      "none": torch.float32}

_DEFAULT_PATTERNS: dict[str, dict[str, tuple[str, ...]]] = {
    "llm": {"include": LLM_INCLUDE, "exclude": ()},
    "yak": {"include": (), "exclude": YAK_KEEP_BF16},
}


def _spec(key: str, fmt: str, backend: str = "auto", **kw: Any) -> QuantSpec:
    patterns = dict(_DEFAULT_PATTERNS.get(key, {"include": (), "exclude": ()}))
    patterns.update({k: tuple(v) for k, v in kw.items() if k in ("include", "exclude")})
    rest = {k: v for k, v in kw.items() if k not in ("include", "exclude")}
    return QuantSpec(fmt, backend, include=patterns["include"], exclude=patterns["exclude"], **rest)


@dataclass(frozen=True)
class QuantPolicy:
    """What each component becomes: a `QuantSpec` per policy key, plus storage dtypes.

    `specs` maps llm, llm_embed, vision, visual_head, vte, yak to a QuantSpec (include/exclude
    patterns are relative to the component's root module, see `COMPONENT_ROOTS`). Formats
    "none"/"bf16"/"fp16" mean "not quantized" (stored in `dtype`). `vae_dtype` is the
    VAE's storage dtype (the VAE is never quantized). `device_type` is the device the policy was
    resolved for: backend "auto" picks bitsandbytes only on CUDA, quanto (else pure torch)
    elsewhere. `int4_fallback`: on cpu/cuda, int4 layers that would not get quanto's TinyGemm
    kernel (in_features <= 128 or not a multiple of 128, or N % 16 != 0 on CPU) get this format
    instead, because quanto's generic int4 path JIT-compiles a C++ extension (~26 s); None keeps them.
    """

    name: str
    specs: Mapping[str, QuantSpec]
    dtype: torch.dtype = torch.bfloat16
    vae_dtype: torch.dtype = torch.float32
    device_type: str = "cpu"
    int4_fallback: str | None = "int8"
    description: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.specs) - set(POLICY_KEYS)
        if unknown:
            raise ValueError(f"unknown policy component(s) {sorted(unknown)}; valid: {', '.join(POLICY_KEYS[:-1])}")
        specs = {k: self.specs.get(k, QuantSpec("none")) for k in POLICY_KEYS if k != "vae"}
        for key in ("llm_embed", "vte"):
            if specs[key].format not in TABLE_FORMATS:
                raise ValueError(f"{key} can be {', '.join(TABLE_FORMATS)}, not {specs[key].format!r}")
        object.__setattr__(self, "specs", specs)

    def spec(self, key: str) -> QuantSpec:
        """The QuantSpec of a policy key (as configured; backend may still be "auto")."""
        return self.specs[key]

    def override(self, overrides: Mapping[str, Any] | None = None, **kw: Any) -> "QuantPolicy":
        """A copy with some components changed: `override(llm="int8", yak={"exclude": ()}, vae="fp16")`.

        A value is a QuantSpec, a format name (keeps the component's include/exclude patterns,
        backend back to "auto"), or a dict of QuantSpec fields applied to the current spec.
        `vae` takes "bf16", "fp16" or "fp32" (or a torch dtype). The name gets a "+custom" suffix.
        """
        changes = {**(overrides or {}), **kw}
        specs = dict(self.specs)
        vae_dtype = self.vae_dtype
        for key, value in changes.items():
            if key == "vae":
                if isinstance(value, torch.dtype) and value in VAE_DTYPES.values():
                    vae_dtype = value
                elif isinstance(value, str) and value in VAE_DTYPES:
                    vae_dtype = VAE_DTYPES[value]
                else:
                    raise ValueError(f"the VAE is never quantized; vae can be bf16, fp16 or fp32, not {value!r}")
                continue
            if key not in specs:
                raise ValueError(f"unknown policy component {key!r}; valid: {', '.join(POLICY_KEYS)}")
            if isinstance(value, QuantSpec):
                specs[key] = value
            elif isinstance(value, str):
                specs[key] = replace(specs[key], format=value, backend="auto")
            elif isinstance(value, Mapping):
                fields = {k: (tuple(v) if k in ("include", "exclude") else v) for k, v in value.items()}
                specs[key] = replace(specs[key], **fields)
            else:
                raise ValueError(f"override for {key!r} must be a QuantSpec, a format name or a dict, got {value!r}")
        name = self.name if self.name.endswith("+custom") else f"{self.name}+custom"
        return replace(self, name=name, specs=specs, vae_dtype=vae_dtype)

    def with_dtype(self, dtype: torch.dtype) -> "QuantPolicy":
        """A copy computing in `dtype` everywhere: unquantized storage and quantized layers' compute.

        Changing only the storage dtype would mix dtypes inside one attention (an fp32 q next to a
        bf16 v from a quantized projection). quanto's int4 kernel needs bf16; other int4 layers then
        take `int4_fallback`.
        """
        specs = {k: replace(s, compute_dtype=dtype) for k, s in self.specs.items()}
        return replace(self, dtype=dtype, specs=specs)

    def dtype_for(self, name: str) -> torch.dtype:
        """Storage dtype of an unquantized checkpoint tensor (usable as `load_model(dtype=...)`)."""
        if name.startswith(COMPONENT_ROOTS["vae"] + "."):
            return self.vae_dtype
        return self.dtype

    def resolved(self, key: str) -> QuantSpec:
        """The spec with backend "auto" resolved for `device_type` (bnb only on CUDA)."""
        return resolve_spec(self.specs[key], self.device_type)

    def layer_spec(self, key: str, rel_name: str, out_features: int, in_features: int) -> QuantSpec | None:
        """Explicit spec for one Linear (name relative to the component root), or None to keep it plain."""
        spec = self.specs[key]
        if spec.format == "none" or not spec.matches(rel_name):
            return None
        spec = resolve_spec(spec, self.device_type)
        if (spec.format == "int4" and spec.backend == "quanto" and self.int4_fallback
                and self.device_type in ("cpu", "cuda")
                and not quanto_backend.tinygemm_ok(out_features, in_features,
                                                    effective_group_size(in_features, spec.group_size),
                                                    spec.compute_dtype, self.device_type)):
            spec = resolve_spec(replace(spec, format=self.int4_fallback, backend="auto"), self.device_type)
        return None if spec.format == "none" else spec

    def formats(self) -> dict[str, str]:
        """{key: "int4/quanto g128"...}: a one-word summary per component (resolved)."""
        out: dict[str, str] = {}
        for key in POLICY_KEYS:
            if key == "vae":
                out[key] = dtype_name(self.vae_dtype)
                continue
            s = self.resolved(key)
            if s.format == "none":
                out[key] = dtype_name(self.dtype)
            elif s.format in ("bf16", "fp16"):
                out[key] = s.format
            else:
                extra = f" g{s.group_size}" if s.format == "int4" else ""
                excl = f" (excl. {len(s.exclude)} patterns)" if s.exclude else ""
                out[key] = f"{s.format}/{s.backend}{extra}{excl}"
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (stored in the manifest of pre-quantized checkpoints)."""
        return {
            "name": self.name, "device_type": self.device_type, "dtype": dtype_name(self.dtype),
            "vae_dtype": dtype_name(self.vae_dtype), "int4_fallback": self.int4_fallback,
            "specs": {k: {"format": s.format, "backend": s.backend, "group_size": s.group_size,
                          "include": list(s.include), "exclude": list(s.exclude),
                          "compute_dtype": dtype_name(s.compute_dtype), "double_quant": s.double_quant}
                      for k, s in self.specs.items()},
        }


def _bnb_usable() -> bool:
    return bnb_backend.unavailable_reason(torch.device("cpu")) is None


def _quanto_usable() -> bool:
    return quanto_backend._load() is not None


def resolve_spec(spec: QuantSpec, device_type: str) -> QuantSpec:
    """Turn backend "auto" into an explicit backend for `device_type` (never touches a device).

    nf4/fp4: bitsandbytes on CUDA, else quanto int4 (same group size), else torch int8.
    int4/int8/fp8: quanto, else torch int8. bf16/fp16/none: torch (a cast or nothing).
    """
    if spec.format in ("none", "bf16", "fp16"):
        return replace(spec, backend="torch")
    if spec.backend != "auto":
        return spec
    fmt = spec.format
    if fmt in ("nf4", "fp4"):
        if device_type == "cuda" and _bnb_usable():
            return replace(spec, backend="bnb")
        fmt = "int4"
    if _quanto_usable() and device_type != "meta":
        return replace(spec, format=fmt, backend="quanto")
    return replace(spec, format="int8", backend="torch")


POLICY_NAMES: tuple[str, ...] = ("reference", "quality", "balanced", "low", "tiny", "minimal", "mps", "cpu")

_POLICY_DOCS = {
    "reference": "no quantization; bf16 weights, fp32 VAE (what the reference runs)",
    "quality": "no quantization; bf16 weights, fp32 VAE (offload, set elsewhere, is what differs from reference)",
    "balanced": "8 GB GPUs: LLM 4-bit, embeddings/head/VTE/vision/Yak 8-bit including Yak modulation (Yak "
                "embedders, final layer and norms bf16), VAE bf16",
    "low": "6 GB GPUs: the balanced formats (the preset's smaller budget and sampler are what differ)",
    "tiny": "4 GB GPUs: low, plus Yak 4-bit (NF4 on CUDA / quanto int4 elsewhere; same bf16 exclusions as balanced)",
    "minimal": "2 GB GPUs: tiny, plus the vision backbone 4-bit",
    "mps": "Apple: balanced formats with quanto everywhere (no bitsandbytes): LLM int4 g128, the rest int8",
    "cpu": "CPU: only the decode-bound LLM layers are quantized (quanto int4; bf16 embedding/head); compute-bound parts "
           "(vision, visual head, VTE, Yak) stay bf16, where AMX/AVX512-BF16 GEMMs are fastest; VAE fp32",
}


def policy_for(preset: str, device_type: str = "cpu") -> QuantPolicy:
    """The named policy for a preset (see `POLICY_NAMES`), resolved for a device type (cpu/cuda/mps/...)."""
    if preset not in POLICY_NAMES:
        raise ValueError(f"unknown quantization policy {preset!r}; valid: {', '.join(POLICY_NAMES)}")
    device_type = torch.device(device_type).type if device_type not in ("meta",) else "meta"
    none = {k: _spec(k, "none") for k in POLICY_KEYS if k != "vae"}
    doc = _POLICY_DOCS[preset]
    if preset in ("reference", "quality"):
        return QuantPolicy(preset, none, vae_dtype=torch.float32, device_type=device_type, description=doc)
    four = "nf4" if device_type == "cuda" else "int4"
    # Yak's modulation Linears are 297M parameters: at bf16 they alone keep the model above the 8 GB
    # policy's 3.2 GB target, and at int8 they add 0.0006 of velocity error (docs/quantization.md).
    yak_int8 = _spec("yak", "int8", exclude=YAK_EMBEDDERS + YAK_FINAL)
    balanced = {
        "llm": _spec("llm", four), "llm_embed": _spec("llm_embed", "int8", "torch"),
        "vision": _spec("vision", "int8"), "visual_head": _spec("visual_head", "int8"),
        "vte": _spec("vte", "int8", "torch"), "yak": yak_int8,
    }
    if preset in ("balanced", "low"):
        return QuantPolicy(preset, balanced, vae_dtype=torch.bfloat16, device_type=device_type, description=doc)
    if preset == "mps":
        quanto = {**balanced, "llm": _spec("llm", "int4", "quanto"), "vision": _spec("vision", "int8", "quanto"),
                  "visual_head": _spec("visual_head", "int8", "quanto"),
                  "yak": _spec("yak", "int8", "quanto", exclude=YAK_EMBEDDERS + YAK_FINAL)}
        return QuantPolicy(preset, quanto, vae_dtype=torch.float16 if device_type == "mps" else torch.bfloat16,
                           device_type=device_type, description=doc)
    if preset == "cpu":
        # bf16 embedding and head: the int8 head would be dequantized at every decoded token.
        cpu = {**none, "llm": _spec("llm", "int4")}
        return QuantPolicy(preset, cpu, vae_dtype=torch.float32, device_type=device_type, description=doc)
    low = balanced
    tiny = {**low, "yak": _spec("yak", four)}
    if preset == "tiny":
        return QuantPolicy(preset, tiny, vae_dtype=torch.bfloat16, device_type=device_type, description=doc)
    return QuantPolicy(preset, {**tiny, "vision": _spec("vision", four)}, vae_dtype=torch.bfloat16,
                       device_type=device_type, description=doc)


def _as_policy(policy: QuantPolicy | str | None, device_type: str) -> QuantPolicy:
    if policy is None:
        return policy_for("balanced", device_type)
    if isinstance(policy, str):
        return policy_for(policy, device_type)
    return policy


# --------------------------------------------------------------------------------------------
# the int8 visual embedding table
# --------------------------------------------------------------------------------------------


def _aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """Copy CPU tensors that are not 64-byte aligned (safetensors mmaps promise only 8; see quant.serialize)."""
    if t.device.type == "cpu" and t.numel() and t.data_ptr() % alignment:
        return t.clone()
    return t


class Int8VisualEmbedding(nn.Module):
    """The VTE as int8 rows + one fp32 scale per row, with `VisualEmbedding`'s forward contract.

    Float input [..., n] (probabilities over the first n visual words): returns
    `x @ dequant(table[:n])` in `compute_dtype`, computed `block_rows` table rows at a time (the
    row scale is folded into x, accumulation in fp32), so no dequantized copy of the table is ever
    made. Integer input: a row lookup. Always through `forward`, so module hooks see every use.
    `.weight` returns the int8 payload (for code that only asks for its device).
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, compute_dtype: torch.dtype = torch.bfloat16,
                 block_rows: int = 8192) -> None:
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or scale.shape != (qweight.shape[0],):
            raise ValueError(f"expected int8 [V, D] + scale [V], got {qweight.dtype} {tuple(qweight.shape)} "
                             f"and {tuple(scale.shape)}")
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.compute_dtype = compute_dtype
        self.block_rows = block_rows
        self.qweight = nn.Parameter(qweight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight

    @classmethod
    def from_weight(cls, weight: torch.Tensor, device: torch.device | str | None = None,
                    compute_dtype: torch.dtype = torch.bfloat16) -> "Int8VisualEmbedding":
        """Quantize a [V, D] table (per-row symmetric absmax int8, as `quant.quantize_rows_int8`)."""
        target = torch.device(device) if device is not None else weight.device
        q, s = quantize_rows_int8(weight.to(target))
        return cls(q, s, compute_dtype)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.to(self.compute_dtype) * self.scale[:, None].to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        if not x.is_floating_point():
            return F.embedding(x, self.qweight).to(cd) * self.scale[x].unsqueeze(-1).to(cd)
        n = x.shape[-1]
        flat = x.reshape(-1, n)
        out = torch.zeros(flat.shape[0], self.embedding_dim, dtype=torch.float32, device=x.device)
        for start in range(0, n, self.block_rows):
            stop = min(n, start + self.block_rows)
            xs = (flat[:, start:stop].float() * self.scale[start:stop]).to(cd)
            out += (xs @ self.qweight[start:stop].to(cd)).float()
        return out.to(cd).reshape(*x.shape[:-1], self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8, compute_dtype={self.compute_dtype}"


# --------------------------------------------------------------------------------------------
# planning: which module becomes what
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedLayer:
    """One module the policy replaces: a Linear with a spec, or a table (embedding/VTE) at int8."""

    name: str  # qualified in OvisU1
    key: str  # policy key
    kind: str  # "linear" | "embedding" | "vte"
    spec: QuantSpec | None  # linear only
    shape: tuple[int, int]
    bias: bool


def _plain_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and not (quanto_backend.owns(m) or bnb_backend.owns(m))


def plan_model(model: OvisU1, policy: QuantPolicy) -> dict[str, PlannedLayer]:
    """{qualified module name: PlannedLayer} for every module `policy` quantizes (works on meta)."""
    plan: dict[str, PlannedLayer] = {}
    for key in ("llm", "vision", "visual_head", "yak"):
        root_name = COMPONENT_ROOTS[key]
        root = model.get_submodule(root_name)
        for rel, m in root.named_modules():
            if not rel or not _plain_linear(m):
                continue
            name = f"{root_name}.{rel}"
            if name == HEAD_NAME:
                continue  # the tied head follows llm_embed
            spec = policy.layer_spec(key, rel, m.out_features, m.in_features)
            if spec is not None and spec.format in QUANT_FORMATS:
                plan[name] = PlannedLayer(name, key, "linear", spec, (m.out_features, m.in_features),
                                          m.bias is not None)
    if policy.spec("llm_embed").format == "int8":
        emb = model.get_submodule(EMBED_NAME)
        if isinstance(emb, nn.Embedding):
            plan[EMBED_NAME] = PlannedLayer(EMBED_NAME, "llm_embed", "embedding", None,
                                            (emb.num_embeddings, emb.embedding_dim), False)
    if policy.spec("vte").format == "int8" and isinstance(model.vte, nn.Embedding):
        plan[VTE_NAME] = PlannedLayer(VTE_NAME, "vte", "vte", None,
                                      (model.vte.num_embeddings, model.vte.embedding_dim), False)
    return plan


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def _build_layer(p: PlannedLayer, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device,
                 policy: QuantPolicy, padding_idx: int | None = None) -> nn.Module:
    if p.kind == "linear":
        assert p.spec is not None
        return quantize_linear_from_weight(weight, bias, p.spec, device, p.spec.compute_dtype)
    if p.kind == "embedding":
        return Int8Embedding.from_weight(weight, device, padding_idx, policy.dtype)
    return Int8VisualEmbedding.from_weight(weight, device, policy.dtype)


# --------------------------------------------------------------------------------------------
# quantize an already loaded model
# --------------------------------------------------------------------------------------------


@dataclass
class ModelQuantReport(LayerTotals):
    """What `quantize_model` / the streaming loader replaced, with honest bytes per layer and component."""

    policy: str
    layers: list[LayerReport] = field(default_factory=list)
    component_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.component_bytes.values())

    def formats(self) -> dict[str, int]:
        """{"int4/quanto": n_layers, ...}."""
        out: dict[str, int] = {}
        for r in self.layers:
            k = f"{r.format}/{r.backend}"
            out[k] = out.get(k, 0) + 1
        return out


def component_modules(model: OvisU1) -> dict[str, nn.Module]:
    """The six components' root modules (llm includes embed_tokens and lm_head)."""
    return {c: model.get_submodule(COMPONENT_ROOTS[c]) for c in COMPONENTS}


def component_nbytes(model: OvisU1) -> dict[str, int]:
    """Honest bytes per component of a loaded (possibly quantized) model."""
    return {c: module_nbytes(m) for c, m in component_modules(model).items()}


def _layer_report(p: PlannedLayer, new: nn.Module, before: int) -> LayerReport:
    kind = layer_kind(new)
    fmt, backend, gs = (kind.format, kind.backend, kind.group_size) if kind else ("int8", "torch", None)
    requested = p.spec.format if p.spec is not None else "int8"
    return LayerReport(p.name, requested, fmt, backend, gs, p.shape, before, module_nbytes(new))


@torch.no_grad()
def quantize_model(model: OvisU1, policy: QuantPolicy | str, device: torch.device | str | None = None,
                   cast: bool = True) -> ModelQuantReport:
    """Quantize a loaded Ovis-U1 in place, one layer at a time, as `policy` says.

    With `cast` (default), every parameter that is not quantized is first cast to the policy's
    storage dtype (`policy.dtype`, VAE `policy.vae_dtype`), so the result equals
    `load_quantized_model` of the same checkpoint. Layers are built on `device` (default: where
    each weight lives). A policy name is resolved for that device's type.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    policy = _as_policy(policy, dev.type)
    plan = plan_model(model, policy)
    if cast:
        for name, p in list(model.named_parameters()):
            want = policy.dtype_for(name)
            if p.is_floating_point() and p.dtype != want:
                set_tensor(model, name, p.detach().to(want))
        if isinstance(model.get_submodule(EMBED_NAME), nn.Embedding) and isinstance(model.llm.lm_head, nn.Linear):
            tie_weights(model)
    report = ModelQuantReport(policy.name)
    for name, p in plan.items():
        old = model.get_submodule(name)
        before = module_nbytes(old)
        if p.kind == "linear":
            new = _build_layer(p, old.weight, old.bias, dev, policy)
        else:
            new = _build_layer(p, old.weight, None, dev, policy, getattr(old, "padding_idx", None))
        new.train(False)
        _set_module(model, name, new)
        report.layers.append(_layer_report(p, new, before))
        if p.kind == "embedding":
            if model.llm.lm_head.weight is not old.weight:
                raise ValueError("llm.lm_head is not tied to embed_tokens; cannot share the int8 payload")
            _set_module(model, HEAD_NAME, new.tied_linear(EMBED_NAME))
        del old, new
    model.requires_grad_(False)
    report.component_bytes = component_nbytes(model)
    return report


# --------------------------------------------------------------------------------------------
# streaming quantized loading
# --------------------------------------------------------------------------------------------


@dataclass
class QuantLoadReport(LoadReport):
    """`LoadReport` plus what was quantized and how much was read from disk."""

    policy: str = ""
    prequantized: bool = False
    quant: ModelQuantReport | None = None
    bytes_read: int = 0  # bytes of every tensor read from the checkpoint
    largest_tensor_bytes: int = 0
    names_read: list[str] = field(default_factory=list)


#: After quantizing a weight at least this big, give freed heap pages back to the OS. Without it,
#: glibc's dynamic mmap threshold keeps the quantizers' large fp32 transients in the heap and the
#: full-size streaming load peaked at 7.8 GB RssAnon for a 3.4 GB result.
TRIM_AFTER_BYTES = 16 << 20
_LIBC: Any = None


def _malloc_trim() -> None:
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        _LIBC = False


class StreamingQuantizer:
    """A `placer` for the checkpoint stream: quantizes planned layers as their tensors arrive.

    Call it as `placer(model, name, tensor) -> bool` (True when it took the tensor). A Linear's
    weight and bias arrive as separate tensors (bias usually first: safetensors sorts names), so
    whichever comes first is kept (cast to the storage dtype; only biases and at most one weight
    are ever held) until its partner arrives, then the layer is built and placed. embed_tokens
    becomes an Int8Embedding and lm_head an Int8Linear sharing its payload; vte an
    Int8VisualEmbedding. Call `finish()` after the stream to check nothing is left pending.
    Note: `lite.model.checkpoint.load_model` calls `tie_weights`, which needs `embed_tokens.weight`, so
    with an int8 embedding use `load_quantized_model` (which runs this placer) instead.
    """

    def __init__(self, model: OvisU1, policy: QuantPolicy, device: torch.device | str) -> None:
        self.policy = policy
        self.device = torch.device(device)
        self.plan = plan_model(model, policy)
        self.padding_idx = getattr(model.get_submodule(EMBED_NAME), "padding_idx", None)
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.report = ModelQuantReport(policy.name)
        self.max_pending_bytes = 0

    def __call__(self, model: OvisU1, name: str, tensor: torch.Tensor) -> bool:
        module_name, _, leaf = name.rpartition(".")
        p = self.plan.get(module_name)
        if p is None:
            return False
        value = tensor.to(dtype=self.policy.dtype_for(name))
        parts = self.pending.setdefault(module_name, {})
        parts[leaf] = value
        needed = {"weight", "bias"} if p.bias else {"weight"}
        if not needed <= parts.keys():
            if value.data_ptr() == tensor.data_ptr():
                parts[leaf] = value.clone()  # do not pin the mmapped shard's page
            self.max_pending_bytes = max(self.max_pending_bytes, sum(t.nbytes for t in parts.values()))
            return True
        del self.pending[module_name]
        with torch.no_grad():
            new = _build_layer(p, parts["weight"], parts.get("bias"), self.device, self.policy, self.padding_idx)
        new.train(False)
        _set_module(model, module_name, new)
        if p.kind == "embedding":
            _set_module(model, HEAD_NAME, new.tied_linear(EMBED_NAME))
        bf16_bytes = sum(t.numel() for t in parts.values()) * 2
        self.report.layers.append(_layer_report(p, new, bf16_bytes))
        del parts, value
        if bf16_bytes >= TRIM_AFTER_BYTES:
            _malloc_trim()
        return True

    def finish(self) -> None:
        if self.pending:
            names = sorted(f"{m}.{k}" for m, parts in self.pending.items() for k in parts)
            raise CheckpointError(f"{len(names)} tensor(s) arrived without their partner weight/bias: "
                                  f"{', '.join(names[:5])}")


def load_quantized_model(path: str | os.PathLike[str] | None, policy: QuantPolicy | str | None = None,
                         device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                         progress: bool = True) -> tuple[OvisU1, QuantLoadReport]:
    """Load an Ovis-U1 checkpoint quantized by `policy`, streaming tensor by tensor.

    A directory written by `save_quantized_checkpoint` (see `is_quantized_checkpoint`) is restored
    from its payloads: no full-precision weight is read and `policy` is ignored (the checkpoint's
    formats win; the report names its policy). Otherwise each tensor is read from the mmapped
    shards, cast, quantized and placed before the next one is read, so peak host RAM is about the
    quantized model plus the largest tensor's transients. `policy` is a QuantPolicy or a name
    (resolved for `device`'s type; default "balanced"); `dtype` overrides its compute/storage dtype.
    """
    directory = find_checkpoint(path)
    device = torch.device(device)
    if is_quantized_checkpoint(directory):
        return _load_prequantized(directory, device, progress)
    policy = _as_policy(policy, device.type)
    if dtype is not None:
        policy = policy.with_dtype(dtype)
    config = load_config(directory)
    trim_host_heap()
    report = QuantLoadReport(path=directory, rss_anon_before=rss_anon_bytes(), policy=policy.name)
    start = time.perf_counter()
    with torch.device("meta"):
        model = OvisU1(config)
    entries = index_checkpoint(directory)
    validate_checkpoint(model, entries)
    placer = StreamingQuantizer(model, policy, device)
    peak = report.rss_anon_before
    for name, tensor in _progress(iter_checkpoint_tensors(entries), len(entries), progress):
        report.stored_dtypes[str(tensor.dtype)] = report.stored_dtypes.get(str(tensor.dtype), 0) + 1
        report.bytes_read += tensor.nbytes
        report.largest_tensor_bytes = max(report.largest_tensor_bytes, tensor.nbytes)
        if name not in TIED_KEYS and not placer(model, name, tensor):
            set_tensor(model, name, tensor.to(device=device, dtype=policy.dtype_for(name)))
        del tensor
        report.tensors += 1
        if report.tensors % 8 == 0:
            peak = max(peak, rss_anon_bytes())
    placer.finish()
    if EMBED_NAME not in placer.plan:
        tie_weights(model)
    _finish_model(model, device)
    report.quant = placer.report
    return model, _close_report(model, report, start, peak)


def _progress(it: Iterator[Any], total: int, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield from it
        return
    from tqdm import tqdm

    with tqdm(total=total, desc="loading", unit="tensor", leave=False) as bar:
        for item in it:
            yield item
            bar.update(1)


def _named_tensors(model: nn.Module, skip: set[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter and persistent buffer, tied ones once, without `state_dict()`
    (which makes quanto unpack every TinyGemm weight); modules named in `skip` are left out whole."""
    seen: set[int] = set()
    for mname, m in model.named_modules():
        if mname in skip or any(mname.startswith(q + ".") for q in skip):
            continue
        prefix = f"{mname}." if mname else ""
        items = list(m._parameters.items()) + [(k, b) for k, b in m._buffers.items()
                                                if k not in m._non_persistent_buffers_set]
        for leaf, t in items:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            yield prefix + leaf, t


def _finish_model(model: OvisU1, device: torch.device) -> None:
    init_non_persistent_buffers(model, device)
    leftover = [n for n, t in _named_tensors(model) if t.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"{len(leftover)} tensor(s) were not loaded: {', '.join(leftover[:5])}")
    model.eval().requires_grad_(False)


def _close_report(model: OvisU1, report: QuantLoadReport, start: float, peak: int) -> QuantLoadReport:
    report.seconds = time.perf_counter() - start
    report.peak_rss_anon_bytes = max(peak, rss_anon_bytes())
    report.component_bytes = component_nbytes(model)
    if report.quant is not None:
        report.quant.component_bytes = dict(report.component_bytes)
    trim_host_heap()
    report.rss_anon_after = rss_anon_bytes()
    return report


# --------------------------------------------------------------------------------------------
# pre-quantized checkpoints
# --------------------------------------------------------------------------------------------

MANIFEST_FILE = "ovis_lite_quant.json"
MANIFEST_FORMAT = "ovis-lite-quantized-checkpoint"
MANIFEST_VERSION = 1
SHARD_BYTES = 1 << 30
COPIED_FILES = ("config.json", "preprocessor_config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                "chat_template.json", "chat_template.jinja")


class QuantizedCheckpointError(CheckpointError):
    """A pre-quantized checkpoint whose manifest is corrupt, mismatched, or unportable to this device."""


def is_quantized_checkpoint(directory: str | os.PathLike[str]) -> bool:
    """True for a directory written by `save_quantized_checkpoint` (it holds `ovis_lite_quant.json`)."""
    return (Path(directory) / MANIFEST_FILE).is_file()


def source_checkpoint_hash(directory: str | os.PathLike[str]) -> str:
    """sha256 over the index file, then per shard (sorted): name, size and the raw safetensors header.

    Cheap (reads headers only), and changes whenever any tensor's name, dtype, shape or offset,
    or any shard's size, changes. It does not hash tensor data.
    """
    directory = Path(directory)
    h = hashlib.sha256()
    index = directory / INDEX_FILE
    if index.exists():
        h.update(b"index\0" + index.read_bytes())
    for shard in sorted(directory.glob("*.safetensors")):
        size = shard.stat().st_size
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = f.read(min(n, 100 << 20))
        h.update(f"\0{shard.name}\0{size}\0".encode() + header)
    return "sha256:" + h.hexdigest()


def _versions() -> dict[str, str]:
    from lite import __version__

    return {"ovis_lite": __version__, "quant_format": QUANT_FORMAT_VERSION, "torch": torch.__version__}


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"{out} exists and is not empty; refusing to overwrite it (choose a new --out folder)")


def save_quantized_checkpoint(model_dir: str | os.PathLike[str] | None, policy_name: str | QuantPolicy,
                              out_dir: str | os.PathLike[str], device_type: str = "cpu",
                              progress: bool = False) -> dict[str, Any]:
    """Quantize `model_dir` with a named policy and write a pre-quantized checkpoint to `out_dir`.

    `device_type` is the device the checkpoint is meant for (it picks the backends: "cuda" gives
    bnb NF4 for 4-bit, anything else quanto int4); quantization itself runs on the CPU, streaming.
    Writes `quantized-0000N.safetensors` shards (quantized payloads keyed `<module>.<part>` plus
    every unquantized tensor in its storage dtype), copies config/tokenizer/preprocessor files and
    finally `ovis_lite_quant.json` (written last, so an interrupted run is not mistaken for a
    checkpoint). Never overwrites: a non-empty `out_dir` raises OutputError. Returns the manifest.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    _check_out_dir(out)
    src = find_checkpoint(model_dir)
    if is_quantized_checkpoint(src):
        raise QuantizedCheckpointError(f"{src} is already a quantized checkpoint; quantize the original checkpoint")
    policy = policy_name if isinstance(policy_name, QuantPolicy) else policy_for(policy_name, device_type)
    model, report = load_quantized_model(src, policy, device="cpu", progress=progress)
    tensors, entries = export_quantized(model)
    vte_entries: dict[str, dict[str, Any]] = {}
    if isinstance(model.vte, Int8VisualEmbedding):
        tensors[f"{VTE_NAME}.qweight"] = model.vte.qweight.detach()
        tensors[f"{VTE_NAME}.scale"] = model.vte.scale.detach()
        vte_entries[VTE_NAME] = {"kind": "vte", "format": "int8", "backend": "torch",
                                 "shape": [model.vte.num_embeddings, model.vte.embedding_dim],
                                 "compute_dtype": dtype_name(model.vte.compute_dtype), "tensors": ["qweight", "scale"]}
    quantized = set(entries) | set(vte_entries)
    unquantized: dict[str, str] = {}
    for name, t in _named_tensors(model, quantized):
        if name in TIED_KEYS:
            continue
        tensors[name] = t.detach()
        unquantized[name] = dtype_name(t.dtype)
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size, index = 0, 0

    def flush() -> None:
        nonlocal shard, size, index
        if shard:
            index += 1
            fname = f"quantized-{index:05d}.safetensors"
            save_file({k: v.contiguous() for k, v in shard.items()}, str(out / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            shard, size = {}, 0

    for name in sorted(tensors):
        t = tensors[name]
        if size and size + t.nbytes > SHARD_BYTES:
            flush()
        shard[name] = t
        size += t.nbytes
    flush()
    for fname in COPIED_FILES:
        if (src / fname).is_file():
            shutil.copy2(src / fname, out / fname)
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "policy": policy.name,
        "policy_detail": policy.to_dict(), "target_device_type": device_type, "versions": _versions(),
        "source": {"path": str(src), "hash": source_checkpoint_hash(src),
                   "hash_method": "sha256(index file + per shard: name, size, safetensors header)"},
        "config_sha256": hashlib.sha256((src / "config.json").read_bytes()).hexdigest(),
        "modules": entries, "lite_modules": vte_entries, "unquantized": unquantized,
        "tied_head": EMBED_NAME in entries, "weight_map": weight_map,
        "component_bytes": report.component_bytes,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def read_checkpoint_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a pre-quantized checkpoint, structurally validated (one-line errors)."""
    path = Path(directory) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except OSError as exc:
        raise QuantizedCheckpointError(f"{path} cannot be read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QuantizedCheckpointError(f"{path} is corrupt: not valid JSON ({exc}); re-run ovis-lite quantize") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise QuantizedCheckpointError(f"{path} is not an ovis-lite quantized-checkpoint manifest")
    if manifest.get("version") != MANIFEST_VERSION:
        raise QuantizedCheckpointError(f"{path} has manifest version {manifest.get('version')!r}; this ovis-lite reads "
                                       f"version {MANIFEST_VERSION}; re-run ovis-lite quantize")
    if manifest.get("versions", {}).get("quant_format") != QUANT_FORMAT_VERSION:
        raise QuantizedCheckpointError(f"{path} uses quant payload format "
                                       f"{manifest.get('versions', {}).get('quant_format')!r}, expected "
                                       f"{QUANT_FORMAT_VERSION!r}; re-run ovis-lite quantize")
    for key, kind in (("modules", dict), ("lite_modules", dict), ("unquantized", dict), ("weight_map", dict)):
        if not isinstance(manifest.get(key), kind):
            raise QuantizedCheckpointError(f"{path} is corrupt: {key!r} is missing or not an object")
    return manifest


class _LazyShards(Mapping[str, torch.Tensor]):
    """name -> tensor, read from the memory-mapped shards on demand (counts what it reads)."""

    def __init__(self, directory: Path, weight_map: Mapping[str, str]) -> None:
        from safetensors import safe_open

        self.weight_map = dict(weight_map)
        self.handles: dict[str, Any] = {}
        self.keys_in: dict[str, set[str]] = {}
        for fname in sorted(set(self.weight_map.values())):
            file = directory / fname
            if not file.is_file():
                raise QuantizedCheckpointError(f"shard {fname} named in {MANIFEST_FILE} is missing from {directory}")
            try:
                handle = safe_open(str(file), framework="pt")
                self.keys_in[fname] = set(handle.keys())
            except Exception as exc:  # noqa: BLE001
                raise QuantizedCheckpointError(f"shard {file} is corrupt ({str(exc).splitlines()[0]})") from None
            self.handles[fname] = handle
        missing = [k for k, f in self.weight_map.items() if k not in self.keys_in[f]]
        if missing:
            raise QuantizedCheckpointError(f"{len(missing)} tensor(s) listed in {MANIFEST_FILE} are not in their shard: "
                                           f"{', '.join(sorted(missing)[:5])}")
        self.bytes_read = 0
        self.largest = 0
        self.names_read: list[str] = []

    def __getitem__(self, key: str) -> torch.Tensor:
        fname = self.weight_map[key]
        t = self.handles[fname].get_tensor(key)
        self.bytes_read += t.nbytes
        self.largest = max(self.largest, t.nbytes)
        self.names_read.append(key)
        return t

    def __contains__(self, key: object) -> bool:
        return key in self.weight_map

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)


def _load_prequantized(directory: Path, device: torch.device, progress: bool) -> tuple[OvisU1, QuantLoadReport]:
    manifest = read_checkpoint_manifest(directory)
    config_file = directory / "config.json"
    if hashlib.sha256(config_file.read_bytes()).hexdigest() != manifest.get("config_sha256"):
        raise QuantizedCheckpointError(f"{directory}: config.json does not match the one {MANIFEST_FILE} was written "
                                       "for; re-run ovis-lite quantize")
    config = load_config(directory)
    trim_host_heap()
    report = QuantLoadReport(path=directory, rss_anon_before=rss_anon_bytes(), policy=str(manifest.get("policy")),
                             prequantized=True)
    start = time.perf_counter()
    with torch.device("meta"):
        model = OvisU1(config)
    shards = _LazyShards(directory, manifest["weight_map"])
    entries: dict[str, dict[str, Any]] = manifest["modules"]
    state_names = {n for n, _ in _named_tensors(model)}
    bad = [n for n in manifest["unquantized"] if n not in state_names]
    if bad:
        raise QuantizedCheckpointError(f"{directory}: {MANIFEST_FILE} lists {len(bad)} tensor(s) the model does not "
                                       f"have: {', '.join(sorted(bad)[:5])}")
    groups: list[dict[str, dict[str, Any]]] = []
    tied = {n: e for n, e in entries.items() if isinstance(e, dict) and e.get("tied_to")}
    for name, entry in entries.items():
        if name in tied:
            continue
        group = {name: entry}
        group.update({n: e for n, e in tied.items() if e.get("tied_to") == name})
        groups.append(group)
    if sum(len(g) for g in groups) != len(entries):
        raise QuantizedCheckpointError(f"{directory}: {MANIFEST_FILE} ties a head to an embedding it does not list")
    qreport = ModelQuantReport(str(manifest.get("policy")))
    peak = report.rss_anon_before
    try:
        for group in groups:
            restore_quantized(model, shards, group, device)
            for name in group:
                new = model.get_submodule(name)
                kind = layer_kind(new)
                shape = tuple(group[name]["shape"])
                qreport.layers.append(LayerReport(name, group[name]["format"], kind.format if kind else "?",
                                                  kind.backend if kind else "?", kind.group_size if kind else None,
                                                  shape, 0, module_nbytes(new)))
            peak = max(peak, rss_anon_bytes())
    except QuantFormatError as exc:
        raise QuantizedCheckpointError(f"{directory}: {exc}") from None
    for name, entry in manifest["lite_modules"].items():
        if name != VTE_NAME or entry.get("kind") != "vte":
            raise QuantizedCheckpointError(f"{directory}: unknown entry {name!r} in {MANIFEST_FILE}")
        v, d = entry.get("shape", [0, 0])
        if (v, d) != (model.vte.num_embeddings, model.vte.embedding_dim):
            raise QuantizedCheckpointError(f"{directory}: vte is {[v, d]} in {MANIFEST_FILE} but "
                                           f"{[model.vte.num_embeddings, model.vte.embedding_dim]} in config.json")
        q, s = shards[f"{name}.qweight"], shards[f"{name}.scale"]
        if q.dtype != torch.int8 or tuple(q.shape) != (v, d) or s.dtype != torch.float32 or tuple(s.shape) != (v,):
            raise QuantizedCheckpointError(f"{directory}: vte payload does not match {MANIFEST_FILE}")
        model.vte = Int8VisualEmbedding(_aligned(q).to(device), _aligned(s).to(device),
                                        dtype_from_name(entry["compute_dtype"]))
    for name, dname in manifest["unquantized"].items():
        t = shards[name]
        if dtype_name(t.dtype) != dname:
            raise QuantizedCheckpointError(f"{directory}: {name} is {t.dtype} but {MANIFEST_FILE} says {dname}")
        set_tensor(model, name, t.to(device))
        report.tensors += 1
    if not manifest.get("tied_head"):
        tie_weights(model)
    try:
        _finish_model(model, device)
    except CheckpointError as exc:
        raise QuantizedCheckpointError(f"{directory}: {exc}") from None
    report.tensors += len(qreport.layers)
    report.bytes_read, report.largest_tensor_bytes = shards.bytes_read, shards.largest
    report.names_read = shards.names_read
    report.quant = qreport
    return model, _close_report(model, report, start, peak)


# --------------------------------------------------------------------------------------------
# exact bytes without weights
# --------------------------------------------------------------------------------------------

_BYTES_KEYS = ("params", "bytes", "packed", "scales", "zeros", "unquantized")


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _layout_device(spec: QuantSpec, device_type: str) -> str:
    # bnb's layout does not depend on the device, and bnb may be importable here without CUDA.
    return device_type if spec.backend == "quanto" and device_type in ("cpu", "cuda", "mps", "xpu") else "cpu"


def _leaf_bytes(model: OvisU1, policy: QuantPolicy) -> dict[str, dict[str, int]]:
    """{qualified module name: {params, packed, scales, zeros, unquantized}} for every module owning tensors.

    Quantized modules get their `layout_nbytes`/`embedding_layout_nbytes` (bias -> unquantized,
    quanto activation scales and bnb code tables -> scales); others count their own parameters at
    the policy's storage dtype. The tied lm_head owns nothing.
    """
    plan = plan_model(model, policy)
    out: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if name in plan:
            p = plan[name]
            n, k = p.shape
            if p.kind == "linear":
                assert p.spec is not None
                lay = layout_nbytes(n, k, p.bias, p.spec, p.spec.compute_dtype, _layout_device(p.spec, policy.device_type))
                out[name] = {"params": n * k + (n if p.bias else 0), "packed": lay["packed"],
                             "scales": lay["scales"] + lay["other"], "zeros": lay["zeros"], "unquantized": lay["bias"]}
            else:
                lay = embedding_layout_nbytes(n, k)
                out[name] = {"params": n * k, "packed": lay["packed"], "scales": lay["scales"] + lay["other"],
                             "zeros": 0, "unquantized": 0}
            continue
        if any(name.startswith(q + ".") for q in plan):
            continue
        own = [(f"{name}.{pn}" if name else pn, t) for pn, t in m.named_parameters(recurse=False)]
        own = [(pn, t) for pn, t in own if pn not in TIED_KEYS]
        bufs = list(m.named_buffers(recurse=False))
        if not own and not bufs:
            continue
        entry = {"params": 0, "packed": 0, "scales": 0, "zeros": 0, "unquantized": 0}
        for pn, t in own:
            entry["params"] += t.numel()
            dt = policy.dtype_for(pn) if t.is_floating_point() else t.dtype
            entry["unquantized"] += t.numel() * _elt(dt)
        for _, b in bufs:  # e.g. RoPE inv_freq (fp32, recomputed at load)
            entry["unquantized"] += b.numel() * b.element_size()
        out[name] = entry
    return out


def quantized_bytes(config: OvisU1Config, policy: QuantPolicy | str, device_type: str | None = None) -> dict[str, Any]:
    """Exact bytes per component of `config` quantized by `policy`, computed on a meta model.

    {"policy", "device_type", "components": {name: {"params", "bytes", "packed", "scales", "zeros",
    "unquantized"}}, "total_params", "total_bytes"}. packed = quantized weight payloads (and int8
    tables), scales = scales + quanto activation scales + bnb code tables, zeros = int4 shifts,
    unquantized = everything kept in bf16/fp16/fp32 (norms, excluded layers, biases, VAE).
    `device_type` resolves a policy name (default cpu); a QuantPolicy keeps its own.
    """
    from lite.model.sizes import meta_model

    policy = _as_policy(policy, device_type or "cpu")
    model = meta_model(config)
    comps = {c: dict.fromkeys(_BYTES_KEYS, 0) for c in COMPONENTS}
    for name, entry in _leaf_bytes(model, policy).items():
        comp = comps[component_of(name + ".")]
        for k in ("params", "packed", "scales", "zeros", "unquantized"):
            comp[k] += entry[k]
    for c in comps.values():
        c["bytes"] = c["packed"] + c["scales"] + c["zeros"] + c["unquantized"]
    return {"policy": policy.name, "device_type": policy.device_type, "formats": policy.formats(),
            "components": comps, "total_params": sum(c["params"] for c in comps.values()),
            "total_bytes": sum(c["bytes"] for c in comps.values())}


def module_bytes(model: OvisU1, policy: QuantPolicy | str) -> dict[str, int]:
    """Qualified module name -> bytes it owns under `policy` (works on a meta model)."""
    return {name: e["packed"] + e["scales"] + e["zeros"] + e["unquantized"]
            for name, e in _leaf_bytes(model, _as_policy(policy, "cpu")).items()}


def make_sizeof(model: OvisU1, policy: QuantPolicy | str) -> Callable[[nn.Module], int]:
    """`sizeof(submodule) -> bytes` it occupies under `policy` (for the offload planner).

    Works on a meta model (bytes come from the quantized layouts, nothing is allocated) and on a
    loaded one: a submodule with real tensors is measured with `module_nbytes` (honest bytes of
    what it holds now). `model` must be the OvisU1 the submodules belong to.
    """
    policy = _as_policy(policy, "cpu")
    leaves = _leaf_bytes(model, policy)
    names = {id(m): n for n, m in model.named_modules()}

    def sizeof(module: nn.Module) -> int:
        if any(t.device.type != "meta" for t in module.parameters()):
            return module_nbytes(module)
        name = names.get(id(module))
        if name is None:
            raise ValueError(f"{type(module).__name__} is not a submodule of this model")
        prefix = name + "." if name else ""
        return sum(e["packed"] + e["scales"] + e["zeros"] + e["unquantized"]
                   for n, e in leaves.items() if n == name or n.startswith(prefix) or not name)

    return sizeof


def format_quantized_bytes(result: dict[str, Any]) -> str:
    """A table of `quantized_bytes` output for the CLI."""
    lines = [f"policy {result['policy']} ({result['device_type']})",
             f"{'component':<12} {'format':<34} {'params':>14} {'bytes':>14} {'packed':>14} {'scales':>12} "
             f"{'zeros':>11} {'unquantized':>13}"]
    fmts = result.get("formats", {})
    for name, c in result["components"].items():
        fmt = fmts.get(name, "")
        if name == "llm" and "llm_embed" in fmts:
            fmt = f"{fmt}; embed {fmts['llm_embed']}"
        lines.append(f"{name:<12} {fmt[:34]:<34} {c['params']:>14,} {c['bytes']:>14,} {c['packed']:>14,} "
                     f"{c['scales']:>12,} {c['zeros']:>11,} {c['unquantized']:>13,}")
    lines.append(f"{'total':<12} {'':<34} {result['total_params']:>14,} {result['total_bytes']:>14,}")
    return "\n".join(lines)


__all__ = [
    "COMPONENT_ROOTS", "Int8VisualEmbedding", "MANIFEST_FILE", "ModelQuantReport", "POLICY_KEYS", "POLICY_NAMES",
    "PlannedLayer", "QuantLoadReport", "QuantPolicy", "QuantizedCheckpointError", "StreamingQuantizer",
    "YAK_KEEP_BF16", "component_nbytes", "format_quantized_bytes", "is_quantized_checkpoint", "load_quantized_model",
    "make_sizeof", "plan_model", "policy_for", "quantize_model", "quantized_bytes", "read_checkpoint_manifest",
    "resolve_spec", "save_quantized_checkpoint", "source_checkpoint_hash",
]
