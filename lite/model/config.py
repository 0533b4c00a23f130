"""Explicit configuration for Ovis-U1, parsed from the checkpoint's own `config.json`.

The real file carries the reference's remote-code config classes; we read the same keys into
plain dataclasses so that one builder can make the full model and tiny test models alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import Qwen3Config

from lite.errors import ConfigError

# The reference config loader renames the "native" AIMv2 model types (spec §2.3).
_MODEL_TYPE_RENAMES = {
    "aimv2_native_visual_tokenizer": "aimv2_visual_tokenizer",
    "aimv2_native": "aimv2",
}


@dataclass(frozen=True)
class VisionConfig:
    """AIMv2 native-resolution backbone plus the softmax visual tokenizer head (spec §2.3)."""

    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 24
    num_attention_heads: int = 8
    num_channels: int = 3
    image_size: int = 448
    patch_size: int = 14
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    use_bias: bool = False
    hidden_stride: int = 2
    temporal_patch_size: int = 1
    preserve_original_pe: bool = True
    interpolate_pe_method: str = "two_dim"
    disable_rope: bool = False
    vocab_size: int = 65536  # visual vocabulary, including the 4 indicator ids

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def head_in_features(self) -> int:
        return self.hidden_size * self.hidden_stride * self.hidden_stride

    @property
    def head_out_features(self) -> int:
        return self.vocab_size - 4

    @property
    def pos_grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class YakConfig:
    """The Yak MMDiT (spec §2.5); refiner constants the reference hard-codes are properties."""

    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 1536
    num_heads: int = 12
    depth: int = 6
    depth_single_blocks: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10000
    context_in_dim: int = 4096
    vec_in_dim: int = 1536
    guidance_embed: bool = False
    timestep_shift: bool = True
    base_shift: float = 0.5
    max_shift: float = 1.15
    refiner_depth: int = 2
    time_embed_dim: int = 256

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def refiner_heads(self) -> int:
        return 2 * self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclass(frozen=True)
class OvisU1Config:
    """The whole model: LLM, vision tokenizer, VTE, Yak and VAE configs in one place."""

    llm: dict[str, Any]
    vision: VisionConfig
    yak: YakConfig
    vae: dict[str, Any]
    hidden_size: int = 2048
    multimodal_max_length: int = 4496
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def qwen3_config(self) -> Qwen3Config:
        """transformers' Qwen3 config built from `llm_config`, with SDPA attention."""
        cfg = Qwen3Config(**{k: v for k, v in self.llm.items() if k not in _HF_NOISE_KEYS})
        cfg._attn_implementation = "sdpa"
        return cfg

    @property
    def vocab_size(self) -> int:
        return int(self.llm["vocab_size"])

    @property
    def eos_token_id(self) -> int:
        return int(self.llm.get("eos_token_id", 151645))

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.get("scaling_factor", 0.13025))

    def to_dict(self) -> dict[str, Any]:
        return self.raw


_HF_NOISE_KEYS = {"_attn_implementation_autoset", "architectures", "_name_or_path", "torch_dtype"}


def _pick(source: dict[str, Any], cls: type, renames: dict[str, str] | None = None) -> dict[str, Any]:
    names = {f for f in cls.__dataclass_fields__}
    out: dict[str, Any] = {}
    for key, value in source.items():
        key = (renames or {}).get(key, key)
        if key in names:
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


def parse_config(data: dict[str, Any]) -> OvisU1Config:
    """Build an `OvisU1Config` from the dict of a real or tiny `config.json`."""
    try:
        llm = dict(data["llm_config"])
        vt = dict(data["visual_tokenizer_config"])
        vg = dict(data["visual_generator_config"])
    except KeyError as exc:
        raise ConfigError(f"config.json has no {exc.args[0]!r}: this is not an Ovis-U1 config") from None
    vt_type = _MODEL_TYPE_RENAMES.get(vt.get("model_type", ""), vt.get("model_type", ""))
    backbone = dict(vt.get("backbone_config") or {})
    bb_type = _MODEL_TYPE_RENAMES.get(backbone.get("model_type", ""), backbone.get("model_type", ""))
    if vt_type != "aimv2_visual_tokenizer" or bb_type != "aimv2":
        raise ConfigError(f"unsupported visual tokenizer {vt_type!r}/{bb_type!r}: expected aimv2")
    if llm.get("model_type") != "qwen3":
        raise ConfigError(f"unsupported LLM {llm.get('model_type')!r}: expected qwen3")
    vision_fields = _pick(backbone, VisionConfig)
    vision_fields["vocab_size"] = int(vt["vocab_size"])
    vision_fields["hidden_stride"] = int(vt.get("hidden_stride", backbone.get("hidden_stride", 2)))
    vision = VisionConfig(**vision_fields)
    yak = YakConfig(**_pick(vg, YakConfig))
    if sum(yak.axes_dim) != yak.head_dim:
        raise ConfigError(f"Yak axes_dim {list(yak.axes_dim)} must sum to the head dim {yak.head_dim}")
    hidden = int(data.get("hidden_size", llm["hidden_size"]))
    if hidden != llm["hidden_size"]:
        raise ConfigError(f"hidden_size {hidden} differs from the LLM's {llm['hidden_size']}")
    if yak.context_in_dim != 2 * hidden:
        raise ConfigError(f"Yak context_in_dim {yak.context_in_dim} must be 2 x LLM hidden ({2 * hidden})")
    return OvisU1Config(
        llm=llm,
        vision=vision,
        yak=yak,
        vae=dict(vg.get("vae_config") or {}),
        hidden_size=hidden,
        multimodal_max_length=int(data.get("multimodal_max_length", 4496)),
        raw=data,
    )


def load_config(path: str | Path) -> OvisU1Config:
    """Read `config.json` (or a checkpoint directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no config file at {path}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return parse_config(data)


@dataclass(frozen=True)
class PreprocessorConfig:
    """`preprocessor_config.json` (a CLIPImageProcessor plus Ovis' pixel budget)."""

    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    patch_size: int = 14
    hidden_stride: int = 2
    temporal_patch_size: int = 1
    min_pixels: int = 200704
    max_pixels: int = 2408448

    @property
    def factor(self) -> int:
        return self.patch_size * self.hidden_stride


def load_preprocessor_config(path: str | Path) -> PreprocessorConfig:
    path = Path(path)
    if path.is_dir():
        path = path / "preprocessor_config.json"
    if not path.exists():
        return PreprocessorConfig()
    data = json.loads(path.read_text())
    return PreprocessorConfig(**_pick(data, PreprocessorConfig))
