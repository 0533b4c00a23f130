"""Per-component precision of Ovis-U1: which format each component is stored and computed in.

`Precision` is the data a preset carries (formats per component, before a device is known);
`Precision.policy(device_type)` resolves it into a `QuantPolicy` of `quant.QuantSpec`s, with backend
"auto" resolved through `quant`'s one auto chain. Components (policy keys): llm (decoder layers),
llm_embed (embed_tokens and the tied lm_head, which shares the int8 payload), vision (AIMv2 backbone),
visual_head (the 65532x4096 Linear), vte (visual embedding table), yak (MMDiT), vae (never quantized:
a storage dtype only). Module paths come from `OvisU1.architecture`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

import quant
from quant import QuantSpec, dtype_name

from lite.model.architecture import OVIS_U1

#: Policy keys: the six model components plus `llm_embed` (embed_tokens + tied lm_head).
POLICY_KEYS: tuple[str, ...] = ("llm", "llm_embed", "vision", "visual_head", "vte", "yak", "vae")
#: Module that each policy key's include/exclude patterns are relative to.
COMPONENT_ROOTS: dict[str, str] = {**OVIS_U1.components, "llm_embed": OVIS_U1.components["llm"]}
#: Formats the two table-like components accept (Int8Embedding / Int8VisualEmbedding, or a cast).
TABLE_FORMATS: tuple[str, ...] = ("int8", "bf16", "fp16", "none")
VAE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                                      "none": torch.float32}
YAK_KEEP_BF16: tuple[str, ...] = OVIS_U1.yak_modulation + OVIS_U1.yak_keep_bf16

_DEFAULT_PATTERNS: dict[str, dict[str, tuple[str, ...]]] = {
    "llm": {"include": OVIS_U1.llm_quantizable, "exclude": ()},
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
    elsewhere. Which layer shapes a backend holds in a format is the backend's own answer
    (`quant.backends.Backend.accepts`, asked by `layer_spec` through quant's chain).
    """

    name: str
    specs: Mapping[str, QuantSpec]
    dtype: torch.dtype = torch.bfloat16
    vae_dtype: torch.dtype = torch.float32
    device_type: str = "cpu"
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
        bf16 v from a quantized projection). quanto's int4 kernel needs bf16: its backend refuses other
        int4 layers, which then take int8 (`quant.backends.SMALLER_FORMAT`).
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
        return quant.resolve(self.specs[key], self.device_type)

    def layer_spec(self, key: str, rel_name: str, out_features: int, in_features: int) -> QuantSpec | None:
        """Explicit spec for one Linear (name relative to the component root), or None to keep it plain; the
        backend the chain lands on decides whether it holds this shape in the format (else a smaller one)."""
        spec = self.specs[key]
        if spec.format == "none" or not spec.matches(rel_name):
            return None
        spec = quant.resolve(spec, self.device_type, (out_features, in_features))
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
            "vae_dtype": dtype_name(self.vae_dtype),
            "specs": {k: {"format": s.format, "backend": s.backend, "group_size": s.group_size,
                          "include": list(s.include), "exclude": list(s.exclude),
                          "compute_dtype": dtype_name(s.compute_dtype), "double_quant": s.double_quant}
                      for k, s in self.specs.items()},
        }


#: "4bit" in a `Precision` means the best 4-bit format of the device: NF4 (bitsandbytes) on CUDA,
#: int4 elsewhere.
FOUR_BIT = "4bit"


@dataclass(frozen=True)
class Precision:
    """Formats per component, as a preset states them before the device is known.

    `llm`, `vision`, `visual_head`, `yak`: a quant format, "none", or "4bit". `llm_embed`, `vte`:
    "int8" or "none" (the tables use the torch int8 layers). `yak_modulation`: whether Yak's adaLN
    modulation Linears are quantized with the rest of Yak (its embedders and final layer never are).
    `backend` forces one backend for the Linear components ("auto" lets the chain choose), `backend_on`
    per device type (a kernel that exists there). `vae` is the VAE's storage dtype, `vae_on` per device type.
    """

    name: str
    description: str
    summary: str = ""  # a few words for the README's preset table
    llm: str = "none"
    llm_embed: str = "none"
    vision: str = "none"
    visual_head: str = "none"
    vte: str = "none"
    yak: str = "none"
    yak_modulation: bool = False
    backend: str = "auto"
    backend_on: Mapping[str, str] = field(default_factory=dict)
    vae: str = "fp32"
    vae_on: Mapping[str, str] = field(default_factory=dict)

    def policy(self, device_type: str = "cpu") -> QuantPolicy:
        """The QuantPolicy for a device type (cpu/cuda/mps/meta)."""
        device_type = torch.device(device_type).type if device_type != "meta" else "meta"
        four = "nf4" if device_type == "cuda" else "int4"
        backend = self.backend_on.get(device_type, self.backend)
        specs: dict[str, QuantSpec] = {}
        for key in ("llm", "vision", "visual_head", "yak"):
            fmt = getattr(self, key)
            fmt = four if fmt == FOUR_BIT else fmt
            kw: dict[str, Any] = {}
            if key == "yak" and fmt != "none" and self.yak_modulation:
                kw["exclude"] = OVIS_U1.yak_keep_bf16
            specs[key] = _spec(key, fmt, backend if fmt != "none" else "auto", **kw)
        for key in ("llm_embed", "vte"):
            fmt = getattr(self, key)
            specs[key] = _spec(key, fmt, "torch" if fmt != "none" else "auto")
        vae = VAE_DTYPES[self.vae_on.get(device_type, self.vae)]
        return QuantPolicy(self.name, specs, vae_dtype=vae, device_type=device_type, description=self.description)


def as_policy(policy: QuantPolicy | Precision | str | None, device_type: str) -> QuantPolicy:
    """A policy from a QuantPolicy, a Precision, or a precision table's name (default: balanced)."""
    if policy is None:
        return BALANCED.policy(device_type)
    if isinstance(policy, str):
        return policy_for(policy, device_type)
    if isinstance(policy, Precision):
        return policy.policy(device_type)
    return policy


# The per-component tables the presets carry (lite/runtime/presets.py). Measured trade-offs:
# docs/quantization.md.
REFERENCE = Precision("reference", "no quantization; bf16 weights, fp32 VAE (what the reference runs)",
                      summary="bf16, fp32 VAE")
QUALITY = replace(REFERENCE, name="quality",
                  description="no quantization; bf16 weights, fp32 VAE (offload is what differs from reference)")
# Yak's modulation Linears are 297M parameters: at bf16 they alone keep the model above the 8 GB
# policy's 3.2 GB target, and at int8 they add 0.0006 of velocity error (docs/quantization.md).
BALANCED = Precision("balanced", "8 GB GPUs: LLM 4-bit, embeddings/head/VTE/vision/Yak 8-bit including Yak "
                     "modulation (Yak embedders, final layer and norms bf16), VAE bf16",
                     summary="LLM 4-bit, ViT/head/VTE/Yak 8-bit",
                     llm=FOUR_BIT, llm_embed="int8", vision="int8", visual_head="int8", vte="int8", yak="int8",
                     yak_modulation=True, vae="bf16")
LOW = replace(BALANCED, name="low",
              description="6 GB GPUs: the balanced formats (the preset's smaller budget and sampler are what differ)")
TINY = replace(BALANCED, name="tiny", yak=FOUR_BIT, yak_modulation=False, summary="as balanced, Yak 4-bit",
               description="4 GB GPUs: low, plus Yak 4-bit (NF4 on CUDA / int4 elsewhere; Yak modulation bf16)")
MINIMAL = replace(TINY, name="minimal", vision=FOUR_BIT, summary="as tiny, ViT 4-bit", description="2 GB GPUs: tiny, plus the vision backbone 4-bit")
# torch's packed-weight kernels have Metal implementations (quanto's MPS int8 op is never dispatched).
MPS = replace(BALANCED, name="mps", llm="int4", backend_on={"mps": "native", "cpu": "native"}, vae="bf16",
              vae_on={"mps": "fp16"},
              summary="int4 LLM, int8 elsewhere (torch packed kernels), fp16 VAE",
              description="Apple: balanced formats on torch's packed int4/int8 kernels, which have Metal "
                          "implementations (no bitsandbytes, no quanto): LLM int4 g128, the rest int8")
# int8 embedding and tied head: the head is read once per decoded token (151936x2048), and int8 halves its
# bytes; few-row CPU calls stream the int8 payload through torch's packed kernel (quant/int8.py), and its
# logit error and greedy agreement are measured in docs/quantization.md. The compute dtype is the CPU's (bf16
# where bf16 GEMMs are native, else fp32 over the same bf16 storage: lite/runtime/hardware.py).
CPU = Precision("cpu", "CPU: the decode-bound LLM quantized (native int4 layers; int8 embedding and tied head); "
                "compute-bound parts (vision, visual head, VTE, Yak) stored bf16 and computed in bf16 where the "
                "CPU has native bf16, else fp32; VAE fp32", llm="int4", llm_embed="int8",
                backend_on={"cpu": "native", "mps": "native"},
                summary="LLM int4, int8 head, bf16 storage elsewhere, fp32 VAE; compute per CPU")

PRECISIONS: dict[str, Precision] = {p.name: p for p in (REFERENCE, QUALITY, BALANCED, LOW, TINY, MINIMAL, MPS, CPU)}


def policy_for(name: str, device_type: str = "cpu") -> QuantPolicy:
    """The named precision table resolved for a device type."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown quantization policy {name!r}; valid: {', '.join(PRECISIONS)}")
    return PRECISIONS[name].policy(device_type)
POLICY_NAMES: tuple[str, ...] = tuple(PRECISIONS)
