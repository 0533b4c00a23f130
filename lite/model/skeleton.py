"""A weightless stand-in for `OvisU1`, built on `meta` from config arithmetic alone.

`presets`, `plan` and `inspect` only need module names, parameter shapes and which modules are
Linear/Embedding. Building the real model for that imports transformers' config and cache modules (our
Qwen3, ~0.4 s) and builds every layer: start-up a table does not need. The skeleton has the
same module tree, names, shapes, buffers and tied head as `OvisU1(config)` on meta (tested against it);
the Yak, the visual tokenizer and the VAE's tree (`lite/model/deferred_vae.py`) are our own torch-only modules
and are built as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lite.model.config import OvisU1Config
from lite.model.deferred_vae import DeferredAutoencoderKL
from lite.model.memory_profile import UNIT_CACHE_ATTR
from lite.model.modeling_aimv2 import VisualEmbedding, VisualTokenizer
from lite.model.modeling_yak import YakTransformer


class _Norm(nn.Module):
    """An RMSNorm's parameters (its forward is never run)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))


def _embedding(cls: type[nn.Embedding], rows: int, dim: int) -> nn.Embedding:
    # Given its weight, an Embedding skips `normal_`, which on meta imports torch._dynamo (seconds).
    return cls(rows, dim, _weight=torch.empty(rows, dim))


def _children(**modules: nn.Module) -> nn.Module:
    parent = nn.Module()
    for name, module in modules.items():
        parent.add_module(name, module)
    return parent


# -- the LLM: Qwen3ForCausalLM (lite/model/modeling_qwen3.py) ------------------------------------------------------

def _qwen3_layer(llm: dict[str, Any]) -> nn.Module:
    hidden, head_dim = int(llm["hidden_size"]), _head_dim(llm)
    heads, kv_heads = int(llm["num_attention_heads"]), int(llm.get("num_key_value_heads") or llm["num_attention_heads"])
    bias, ffn = bool(llm.get("attention_bias", False)), int(llm["intermediate_size"])
    attn = _children(q_proj=nn.Linear(hidden, heads * head_dim, bias), k_proj=nn.Linear(hidden, kv_heads * head_dim, bias),
                     v_proj=nn.Linear(hidden, kv_heads * head_dim, bias), o_proj=nn.Linear(heads * head_dim, hidden, bias),
                     q_norm=_Norm(head_dim), k_norm=_Norm(head_dim))
    mlp = _children(gate_proj=nn.Linear(hidden, ffn, False), up_proj=nn.Linear(hidden, ffn, False),
                    down_proj=nn.Linear(ffn, hidden, False))
    return _children(self_attn=attn, mlp=mlp, input_layernorm=_Norm(hidden), post_attention_layernorm=_Norm(hidden))


def _head_dim(llm: dict[str, Any]) -> int:
    return int(llm.get("head_dim") or int(llm["hidden_size"]) // int(llm["num_attention_heads"]))


def _qwen3(llm: dict[str, Any]) -> nn.Module:
    hidden, vocab = int(llm["hidden_size"]), int(llm["vocab_size"])
    rotary = nn.Module()
    for name in ("inv_freq", "original_inv_freq"):  # both non-persistent fp32 buffers of head_dim/2
        rotary.register_buffer(name, torch.empty(_head_dim(llm) // 2), persistent=False)
    model = _children(embed_tokens=_embedding(nn.Embedding, vocab, hidden),
                      layers=nn.ModuleList(_qwen3_layer(llm) for _ in range(int(llm["num_hidden_layers"]))),
                      norm=_Norm(hidden), rotary_emb=rotary)
    causal_lm = _children(model=model, lm_head=nn.Linear(hidden, vocab, False))
    if llm.get("tie_word_embeddings", True):
        causal_lm.lm_head.weight = model.embed_tokens.weight
    return causal_lm


def skeleton_model(config: OvisU1Config) -> nn.Module:
    """`OvisU1(config)`'s module tree on `meta`, without transformers or diffusers."""
    with torch.device("meta"):
        root = nn.Module()
        root.llm = _qwen3(config.llm)
        root.visual_tokenizer = VisualTokenizer(config.vision)
        root.vte = _embedding(VisualEmbedding, config.vision.vocab_size, config.hidden_size)
        root.visual_generator = _children(backbone=YakTransformer(config.yak), vae=DeferredAutoencoderKL(config.vae))
    object.__setattr__(root, UNIT_CACHE_ATTR, {})  # its offload units, cut once per layout (memory_profile)
    return root
