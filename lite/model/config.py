"""Explicit configuration for Ovis-U1, parsed from the checkpoint's own `config.json`.

The real file carries the reference's remote-code config classes; we read the same keys into
plain dataclasses so that one builder can make the full model and tiny test models alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import Qwen3Config

from lite.errors import ConfigError
from lite.model.config_fields import Section, divides, read_json_file, shown

# The reference config loader renames the "native" AIMv2 model types (spec §2.3).
_MODEL_TYPE_RENAMES = {
    "aimv2_native_visual_tokenizer": "aimv2_visual_tokenizer",
    "aimv2_native": "aimv2",
}
_HF_NOISE_KEYS = {"_attn_implementation_autoset", "architectures", "_name_or_path", "torch_dtype"}  # not Qwen3's


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

    @property
    def refiner_mlp_hidden(self) -> int:
        """The token refiner's MLP: ratio 4 whatever `mlp_ratio` says, as the reference builds it (spec §3.6)."""
        return 4 * self.hidden_size


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
        from transformers import Qwen3Config  # transformers takes seconds to import: only when a model is built

        try:
            cfg = Qwen3Config(**{k: v for k, v in self.llm.items() if k not in _HF_NOISE_KEYS})
        except Exception as exc:  # noqa: BLE001 - transformers validates with several exception types
            detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise ConfigError(f"config.json: key 'llm_config' is not a valid Qwen3 config ({detail})") from None
        cfg._attn_implementation = "sdpa"
        return cfg

    @property
    def vocab_size(self) -> int:
        return int(self.llm["vocab_size"])

    @property
    def answer_token_limit(self) -> int:
        """Most new tokens an answer may have: the LLM's positions past the longest prompt window."""
        positions = int(self.llm.get("max_position_embeddings", 0) or 0)
        prompt = int(self.multimodal_max_length)
        if positions <= 0:
            return prompt
        return positions - prompt if positions > prompt else positions

    @property
    def eos_token_id(self) -> int:
        return int(self.llm.get("eos_token_id", 151645))

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.get("scaling_factor", 0.13025))

    def to_dict(self) -> dict[str, Any]:
        return self.raw


# ---------------------------------------------------------------------------------------------
# Checked parsing: every field any later code reads, by type, range and consistency.
# ---------------------------------------------------------------------------------------------

def _llm_config(s: Section) -> dict[str, Any]:
    model_type = s.raw("model_type", None)
    if model_type != "qwen3":
        raise ConfigError(f"{s.source}: key {s.key('model_type')!r} is {shown(model_type)}: unsupported LLM, "
                          f"expected 'qwen3'")
    hidden = s.int("hidden_size")
    s.int("intermediate_size")
    s.int("num_hidden_layers")
    heads = s.int("num_attention_heads")
    kv = s.int("num_key_value_heads", heads)
    divides(s, "num_attention_heads", heads, "num_key_value_heads", kv)
    if s.raw("head_dim", None) is None:
        divides(s, "hidden_size", hidden, "num_attention_heads", heads)
    else:
        head_dim = s.int("head_dim")
        if head_dim % 2:
            raise s.fail("head_dim", "an even integer (RoPE rotates pairs)", head_dim)
    vocab = s.int("vocab_size", low=2)
    s.int("max_position_embeddings")
    s.float("rms_norm_eps", 1e-6, positive=True)
    s.float("rope_theta", 10000.0, positive=True)
    s.float("attention_dropout", 0.0, low=0.0, high=1.0)
    s.int("eos_token_id", 151645, low=0, high=vocab - 1)
    s.int("bos_token_id", None, low=0, high=vocab - 1, nullable=True)
    s.int("pad_token_id", None, low=0, high=vocab - 1, nullable=True)
    s.bool("tie_word_embeddings", True)
    s.bool("attention_bias", False)
    s.bool("use_sliding_window", False)
    s.int("sliding_window", None, nullable=True)
    s.int("max_window_layers", 0, low=0)
    s.str("hidden_act", "silu", choices=LLM_ACTIVATIONS)
    rope_scaling = s.raw("rope_scaling", None)
    if rope_scaling is not None and not isinstance(rope_scaling, dict):
        raise s.fail("rope_scaling", "null or an object", rope_scaling)
    # transformers' own Qwen3Config checks run where the model is built (`OvisU1Config.qwen3_config`): importing
    # it costs seconds, and `presets`/`plan`/`inspect` read only the fields checked above.
    return dict(s.data)


# The activation names transformers' ACT2FN (the LLM) and diffusers' ACT2CLS (the VAE) accept, spelled out so
# that parsing a config imports neither library (tests/model/test_skeleton.py checks both lists against them).
LLM_ACTIVATIONS = ("gelu", "gelu_10", "gelu_fast", "gelu_new", "gelu_python", "gelu_pytorch_tanh", "gelu_python_tanh",
                   "gelu_accurate", "hardswish", "laplace", "leaky_relu", "linear", "mish", "quick_gelu", "relu",
                   "relu2", "relu6", "sigmoid", "silu", "swish", "tanh")
VAE_ACTIVATIONS = ("swish", "silu", "mish", "gelu", "relu")


def _vision_config(vt: Section) -> VisionConfig:
    vt_type = _MODEL_TYPE_RENAMES.get(str(vt.raw("model_type", "")), vt.raw("model_type", ""))
    bb = vt.section("backbone_config")
    bb_type = _MODEL_TYPE_RENAMES.get(str(bb.raw("model_type", "")), bb.raw("model_type", ""))
    if vt_type != "aimv2_visual_tokenizer" or bb_type != "aimv2":
        raise ConfigError(f"{vt.source}: unsupported visual tokenizer {vt_type!r}/{bb_type!r} "
                          f"(keys {vt.key('model_type')!r}, {bb.key('model_type')!r}): expected aimv2")
    d = VisionConfig()
    fields: dict[str, Any] = {
        "hidden_size": bb.int("hidden_size", d.hidden_size),
        "intermediate_size": bb.int("intermediate_size", d.intermediate_size),
        "num_hidden_layers": bb.int("num_hidden_layers", d.num_hidden_layers),
        "num_attention_heads": bb.int("num_attention_heads", d.num_attention_heads),
        "num_channels": bb.int("num_channels", d.num_channels),
        "image_size": bb.int("image_size", d.image_size),
        "patch_size": bb.int("patch_size", d.patch_size),
        "rms_norm_eps": bb.float("rms_norm_eps", d.rms_norm_eps, positive=True),
        "qkv_bias": bb.bool("qkv_bias", d.qkv_bias),
        "use_bias": bb.bool("use_bias", d.use_bias),
        "temporal_patch_size": bb.int("temporal_patch_size", d.temporal_patch_size),
        "preserve_original_pe": bb.bool("preserve_original_pe", d.preserve_original_pe),
        "interpolate_pe_method": bb.str("interpolate_pe_method", d.interpolate_pe_method),
        "disable_rope": bb.bool("disable_rope", d.disable_rope),
        "vocab_size": vt.int("vocab_size", low=5),  # 4 indicator ids + at least one visual word
    }
    fields["hidden_stride"] = vt.int("hidden_stride", bb.int("hidden_stride", 2))
    divides(bb, "hidden_size", fields["hidden_size"], "num_attention_heads", fields["num_attention_heads"])
    head_dim = fields["hidden_size"] // fields["num_attention_heads"]
    if not fields["disable_rope"] and head_dim % 4:
        raise ConfigError(f"{bb.source}: the vision head dim {head_dim} ({bb.key('hidden_size')} / "
                          f"{bb.key('num_attention_heads')}) must be a multiple of 4 for the 2D RoPE")
    if fields["image_size"] < fields["patch_size"]:
        raise ConfigError(f"{bb.source}: key {bb.key('image_size')!r} ({fields['image_size']}) must be at least "
                          f"{bb.key('patch_size')!r} ({fields['patch_size']})")
    return VisionConfig(**fields)


def _yak_config(vg: Section, vae: Section) -> YakConfig:
    d = YakConfig()
    fields: dict[str, Any] = {
        "in_channels": vg.int("in_channels", d.in_channels),
        "out_channels": vg.int("out_channels", d.out_channels),
        "hidden_size": vg.int("hidden_size", d.hidden_size),
        "num_heads": vg.int("num_heads", d.num_heads),
        "depth": vg.int("depth", d.depth, low=0),
        "depth_single_blocks": vg.int("depth_single_blocks", d.depth_single_blocks, low=0),
        "mlp_ratio": vg.float("mlp_ratio", d.mlp_ratio, positive=True),
        "qkv_bias": vg.bool("qkv_bias", d.qkv_bias),
        "axes_dim": vg.int_list("axes_dim", list(d.axes_dim), length=3),
        "theta": vg.int("theta", d.theta),
        "context_in_dim": vg.int("context_in_dim", d.context_in_dim),
        "vec_in_dim": vg.int("vec_in_dim", d.vec_in_dim),
        "guidance_embed": vg.bool("guidance_embed", d.guidance_embed),
        "timestep_shift": vg.bool("timestep_shift", d.timestep_shift),
        "base_shift": vg.float("base_shift", d.base_shift),
        "max_shift": vg.float("max_shift", d.max_shift),
        "refiner_depth": vg.int("refiner_depth", d.refiner_depth, low=0),
        "time_embed_dim": vg.int("time_embed_dim", d.time_embed_dim),
    }
    if any(a % 2 for a in fields["axes_dim"]):
        raise vg.fail("axes_dim", "a list of 3 even integers (RoPE rotates pairs)", list(fields["axes_dim"]))
    if fields["time_embed_dim"] % 2:
        raise vg.fail("time_embed_dim", "an even integer", fields["time_embed_dim"])
    divides(vg, "hidden_size", fields["hidden_size"], "num_heads", fields["num_heads"])
    if int(fields["hidden_size"] * fields["mlp_ratio"]) < 1:
        raise vg.fail("mlp_ratio", "large enough for an MLP of at least one unit", fields["mlp_ratio"])
    yak = YakConfig(**fields)
    if sum(yak.axes_dim) != yak.head_dim:
        raise ConfigError(f"{vg.source}: key {vg.key('axes_dim')!r} {list(yak.axes_dim)} must sum to the head dim "
                          f"{yak.head_dim} (hidden_size / num_heads)")
    latent = vae.int("latent_channels", 4)
    for key in ("in_channels", "out_channels"):
        if fields[key] != 4 * latent:
            raise ConfigError(f"{vg.source}: key {vg.key(key)!r} ({fields[key]}) must be 4 x "
                              f"{vae.key('latent_channels')!r} ({4 * latent}): latents are packed 2x2")
    return yak


def _vae_config(vae: Section) -> dict[str, Any]:
    if not vae.data:
        raise ConfigError(f"{vae.source}: key {vae.prefix!r} is missing or empty: this is not an Ovis-U1 config")
    channels = vae.int_list("block_out_channels")
    vae.int("latent_channels", 4)
    vae.int("in_channels", 3)
    vae.int("out_channels", 3)
    vae.int("layers_per_block", 2)
    vae.int("sample_size", 512)
    groups = vae.int("norm_num_groups", 32)
    for c in channels:
        if c % groups:
            raise ConfigError(f"{vae.source}: every {vae.key('block_out_channels')!r} entry must be a multiple of "
                              f"{vae.key('norm_num_groups')!r} ({groups}), got {list(channels)}")
    for key in ("down_block_types", "up_block_types"):
        if key in vae.data:
            vae.str_list(key, len(channels))
    vae.float("scaling_factor", 0.13025, positive=True)
    vae.str("act_fn", "silu", choices=VAE_ACTIVATIONS)
    return dict(vae.data)


def parse_config(data: object, source: str = "config.json") -> OvisU1Config:
    """Build an `OvisU1Config` from the dict of a real or tiny `config.json`.

    Every field any later code reads is checked here for type and range (one `ConfigError` naming
    `source` and the dotted key), so that a bad config can never surface as a traceback later.
    """
    top = Section(data, source, "")
    llm = _llm_config(top.section("llm_config"))
    vt = top.section("visual_tokenizer_config")
    vg = top.section("visual_generator_config")
    vae_section = vg.section("vae_config", optional=True)
    vision = _vision_config(vt)
    vae = _vae_config(vae_section)
    yak = _yak_config(vg, vae_section)
    hidden = top.int("hidden_size", llm["hidden_size"])
    if hidden != llm["hidden_size"]:
        raise ConfigError(f"{source}: key 'hidden_size' ({hidden}) differs from 'llm_config.hidden_size' "
                          f"({llm['hidden_size']})")
    if yak.context_in_dim != 2 * hidden:
        raise ConfigError(f"{source}: key 'visual_generator_config.context_in_dim' ({yak.context_in_dim}) must be "
                          f"2 x the LLM hidden size ({2 * hidden})")
    return OvisU1Config(
        llm=llm,
        vision=vision,
        yak=yak,
        vae=vae,
        hidden_size=hidden,
        multimodal_max_length=top.int("multimodal_max_length", 4496),
        raw=data,  # type: ignore[arg-type]
    )


def load_config(path: str | os.PathLike[str]) -> OvisU1Config:
    """Read `config.json` (or a checkpoint directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    return parse_config(read_json_file(path, ConfigError, "config file"), str(path))


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


def parse_preprocessor_config(data: object, source: str = "preprocessor_config.json",
                              vision: VisionConfig | None = None) -> PreprocessorConfig:
    """Checked `PreprocessorConfig`; with `vision`, also that patching matches the model's ViT."""
    s = Section(data, source, "")
    d = PreprocessorConfig()
    pp = PreprocessorConfig(
        image_mean=s.float_list("image_mean", list(d.image_mean)),  # type: ignore[arg-type]
        image_std=s.float_list("image_std", list(d.image_std), positive=True),  # type: ignore[arg-type]
        patch_size=s.int("patch_size", d.patch_size),
        hidden_stride=s.int("hidden_stride", d.hidden_stride),
        temporal_patch_size=s.int("temporal_patch_size", d.temporal_patch_size),
        min_pixels=s.int("min_pixels", d.min_pixels),
        max_pixels=s.int("max_pixels", d.max_pixels),
    )
    floor = max(pp.factor * pp.factor, 56 * 56)  # the first resize of a canvas gives at least 56² (spec §4)
    if pp.min_pixels < floor:
        raise ConfigError(f"{source}: key 'min_pixels' ({pp.min_pixels}) must be at least {floor} "
                          f"(one {pp.factor}x{pp.factor} tile: patch_size x hidden_stride, squared)")
    if pp.max_pixels < pp.min_pixels:
        raise ConfigError(f"{source}: key 'max_pixels' ({pp.max_pixels}) must be >= 'min_pixels' ({pp.min_pixels})")
    if vision is not None:
        for key in ("patch_size", "hidden_stride", "temporal_patch_size"):
            if getattr(pp, key) != getattr(vision, key):
                raise ConfigError(f"{source}: key {key!r} ({getattr(pp, key)}) differs from the model's "
                                  f"config.json ({getattr(vision, key)})")
    return pp


def load_preprocessor_config(path: str | os.PathLike[str], vision: VisionConfig | None = None) -> PreprocessorConfig:
    """Read `preprocessor_config.json` (or a directory holding one); the defaults when there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / "preprocessor_config.json"
    if not os.path.lexists(path):
        return PreprocessorConfig()
    return parse_preprocessor_config(read_json_file(path, ConfigError, "preprocessor config"), str(path), vision)
