"""The Qwen3 decoder (Ovis-U1's LLM), computing exactly what transformers' `Qwen3ForCausalLM` computes with SDPA.

Why our own: importing transformers' modeling code (`modeling_utils`, `masking_utils`, the hub-kernel and
distributed integrations) pulls in torch._dynamo, torch._inductor and torch.distributed: about 1.5 s, more than
everything else `ask` does on a tiny model. This module imports only torch and transformers' light pieces (its
`Qwen3Config`, `Cache` and RoPE initialisers). Same module tree and names (the checkpoint's), same operations in
the same order, including SDPA's dispatch choices (`is_causal` where transformers skips the mask, `enable_gqa`,
`pack_gqa` for one query row): tested bitwise against transformers' model, with and without a KV cache.
Supported: full attention (no sliding window), SiLU MLP, every RoPE type transformers' Qwen3 supports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen3Config
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from lite.errors import ConfigError

#: SDPA's own grouped-query path handles head dims up to this (transformers' `use_gqa_in_sdpa`).
GQA_MAX_HEAD_DIM = 256


@dataclass
class Qwen3Output:
    """What transformers' `BaseModelOutputWithPast` / `CausalLMOutputWithPast` hold, for the fields used here."""

    last_hidden_state: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    cache: Cache | None = None

    @property
    def past_key_values(self) -> Cache | None:
        return self.cache


class Qwen3RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class Qwen3MLP(nn.Module):
    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3RotaryEmbedding(nn.Module):
    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        init = self.default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def default_rope_parameters(config: Qwen3Config, **kwargs: Any) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        target = torch.empty(0).device  # the device the model is being built on
        # On meta, `arange` runs through torch._refs, which imports torch._dynamo (seconds): compute on the CPU and
        # pass on the shape (the loader recomputes these buffers on the real device, where transformers does).
        where = torch.device("cpu") if target.type == "meta" else target
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=where) / dim))
        return inv_freq.to(target), 1.0

    @dynamic_rope_update  # a no-op unless the RoPE type is a dynamic one
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, kv_heads, length, head_dim = states.shape
    if n_rep == 1:
        return states
    states = states[:, :, None, :, :].expand(batch, kv_heads, n_rep, length, head_dim)
    return states.reshape(batch, kv_heads * n_rep, length, head_dim)


def _gqa_in_sdpa(mask: torch.Tensor | None, key: torch.Tensor, value: torch.Tensor) -> bool:
    if torch.backends.mps.is_available() and torch.backends.mps.is_built():
        return True  # transformers' choice on MPS with torch >= 2.13
    return mask is None and key.shape[-1] == value.shape[-1] <= GQA_MAX_HEAD_DIM


def sdpa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                   scaling: float, groups: int) -> torch.Tensor:
    """transformers' `sdpa_attention_forward` (inference, no position bias) -> [batch, q, heads, head_dim]."""
    kwargs: dict[str, Any] = {}
    q_len = query.shape[2]
    if groups > 1:
        if _gqa_in_sdpa(mask, key, value):
            kwargs["enable_gqa"] = True
        elif q_len == 1:  # one row: attend on the key/value heads, the query heads folded beside them
            query = query.reshape(query.shape[0], query.shape[1] // groups, groups, query.shape[-1])
            if mask is not None and mask.shape[1] != 1:
                mask = mask.reshape(mask.shape[0], mask.shape[1] // groups, groups, mask.shape[-1])
        else:
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    is_causal = q_len > 1 and mask is None
    if is_causal and key.shape[2] > q_len:
        key, value = key[:, :, :q_len, :], value[:, :, :q_len, :]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, scale=scaling,
                                         is_causal=is_causal, **kwargs)
    out = out.reshape(out.shape[0], -1, q_len, value.shape[-1])
    return out.transpose(1, 2).contiguous()


class Qwen3Attention(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        heads, kv_heads, bias = config.num_attention_heads, config.num_key_value_heads, config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None, cache: Cache | None = None) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        key = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        query, key = (query * cos) + (rotate_half(query) * sin), (key * cos) + (rotate_half(key) * sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs={})
        out = sdpa_attention(query, key, value, mask, self.scaling, self.num_key_value_groups)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous())


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(config, layer_idx)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: Cache | None = None) -> torch.Tensor:
        assert position_embeddings is not None
        residual = hidden_states
        hidden_states = residual + self.self_attn(self.input_layernorm(hidden_states), position_embeddings, mask, cache)
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states))


def causal_mask(q_len: int, past: int, device: torch.device) -> torch.Tensor | None:
    """None where SDPA's own `is_causal` (or no mask) is exact, as transformers decides for SDPA (one query row,
    or no past); else transformers' boolean [1, 1, q, past + q] mask (query i sees keys up to past + i)."""
    if q_len == 1 or past == 0:
        return None
    q = torch.arange(q_len, device=device)[:, None] + past
    return (torch.arange(past + q_len, device=device)[None, :] <= q)[None, None]


class Qwen3Model(nn.Module):
    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ConfigError(f"config.json: llm_config.hidden_act {config.hidden_act!r} is not supported (silu)")
        if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
            raise ConfigError("config.json: llm_config asks for sliding-window attention, which is not supported")
        self.config = config
        rows, dim = config.vocab_size, config.hidden_size  # given its weight, an Embedding skips `normal_`,
        # which on meta imports torch._dynamo; the weights are loaded (or drawn by `lite.model.tiny`) anyway
        self.embed_tokens = nn.Embedding(rows, dim, getattr(config, "pad_token_id", None), _weight=torch.empty(rows, dim))
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                cache: Cache | None = None, use_cache: bool | None = None, output_hidden_states: bool = False,
                past_key_values: Cache | None = None) -> Qwen3Output:
        """`past_key_values` is transformers' older name of `cache`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
        mask = causal_mask(inputs_embeds.shape[1], past, inputs_embeds.device)
        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, position_ids)
        states: list[torch.Tensor] = [hidden]
        for layer in self.layers:
            hidden = layer(hidden, mask=mask, position_embeddings=position_embeddings, cache=cache)
            states.append(hidden)
        hidden = self.norm(hidden)
        states[-1] = hidden  # transformers' hidden_states end with the normed last state
        return Qwen3Output(last_hidden_state=hidden, hidden_states=tuple(states) if output_hidden_states else None,
                           cache=cache if use_cache else None)


class Qwen3ForCausalLM(nn.Module):
    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                cache: Cache | None = None, use_cache: bool | None = None, logits_to_keep: int = 0,
                output_hidden_states: bool = False, past_key_values: Cache | None = None) -> Qwen3Output:
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, cache=cache, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, past_key_values=past_key_values)
        assert out.last_hidden_state is not None
        out.logits = self.lm_head(out.last_hidden_state[:, slice(-logits_to_keep, None), :])
        return out


__all__ = ["Qwen3ForCausalLM", "Qwen3Model", "Qwen3Output", "causal_mask", "sdpa_attention"]
