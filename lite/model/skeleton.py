"""A weightless stand-in for `OvisU1`, built on `meta` from config arithmetic alone.

`presets`, `plan` and `inspect` only need module names, parameter shapes and which modules are
Linear/Embedding. Building the real model for that imports transformers' Qwen3 modeling and diffusers
(with bitsandbytes and torch._dynamo behind them): seconds of start-up for a table. The skeleton has the
same module tree, names, shapes, buffers and tied head as `OvisU1(config)` on meta (tested against it);
the Yak and the visual tokenizer are our own torch-only modules and are built as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lite.model.config import OvisU1Config
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


# -- the LLM: transformers' Qwen3ForCausalLM ------------------------------------------------------

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


# -- the VAE: diffusers' AutoencoderKL ------------------------------------------------------------

def _resnet(c_in: int, c_out: int, groups: int) -> nn.Module:
    block = _children(norm1=nn.GroupNorm(groups, c_in), conv1=nn.Conv2d(c_in, c_out, 3, padding=1),
                      norm2=nn.GroupNorm(groups, c_out), conv2=nn.Conv2d(c_out, c_out, 3, padding=1))
    if c_in != c_out:
        block.add_module("conv_shortcut", nn.Conv2d(c_in, c_out, 1))
    return block


def _mid_block(channels: int, groups: int, attention: bool) -> nn.Module:
    mid = nn.Module()
    if attention:  # one head of width `channels`, registered before the resnets
        mid.attentions = nn.ModuleList([_children(
            group_norm=nn.GroupNorm(groups, channels), to_q=nn.Linear(channels, channels),
            to_k=nn.Linear(channels, channels), to_v=nn.Linear(channels, channels),
            to_out=nn.ModuleList([nn.Linear(channels, channels)]))])
    mid.resnets = nn.ModuleList([_resnet(channels, channels, groups), _resnet(channels, channels, groups)])
    return mid


def _sampling_block(c_in: int, c_out: int, layers: int, groups: int, resample: str | None) -> nn.Module:
    block = _children(resnets=nn.ModuleList(_resnet(c_in if i == 0 else c_out, c_out, groups) for i in range(layers)))
    if resample is not None:
        block.add_module(resample, nn.ModuleList([_children(conv=nn.Conv2d(c_out, c_out, 3, padding=1))]))
    return block


def _vae(vae: dict[str, Any]) -> nn.Module:
    channels = [int(c) for c in vae.get("block_out_channels", [64])]
    layers, groups = int(vae.get("layers_per_block", 1)), int(vae.get("norm_num_groups", 32))
    latent, attention = int(vae.get("latent_channels", 4)), bool(vae.get("mid_block_add_attention", True))
    last = len(channels) - 1
    down = nn.ModuleList(_sampling_block(channels[max(i - 1, 0)], c, layers, groups, None if i == last else "downsamplers")
                         for i, c in enumerate(channels))
    encoder = _children(conv_in=nn.Conv2d(int(vae.get("in_channels", 3)), channels[0], 3, padding=1), down_blocks=down,
                        mid_block=_mid_block(channels[-1], groups, attention),
                        conv_norm_out=nn.GroupNorm(groups, channels[-1]),
                        conv_out=nn.Conv2d(channels[-1], 2 * latent, 3, padding=1))
    up_channels = channels[::-1]
    up = nn.ModuleList(_sampling_block(up_channels[max(i - 1, 0)], c, layers + 1, groups, None if i == last else "upsamplers")
                       for i, c in enumerate(up_channels))
    decoder = _children(conv_in=nn.Conv2d(latent, channels[-1], 3, padding=1), up_blocks=up,
                        mid_block=_mid_block(channels[-1], groups, attention),
                        conv_norm_out=nn.GroupNorm(groups, channels[0]),
                        conv_out=nn.Conv2d(channels[0], int(vae.get("out_channels", 3)), 3, padding=1))
    out = _children(encoder=encoder, decoder=decoder)
    if vae.get("use_quant_conv", True):
        out.add_module("quant_conv", nn.Conv2d(2 * latent, 2 * latent, 1))
    if vae.get("use_post_quant_conv", True):
        out.add_module("post_quant_conv", nn.Conv2d(latent, latent, 1))
    return out


def skeleton_model(config: OvisU1Config) -> nn.Module:
    """`OvisU1(config)`'s module tree on `meta`, without transformers or diffusers."""
    with torch.device("meta"):
        root = nn.Module()
        root.llm = _qwen3(config.llm)
        root.visual_tokenizer = VisualTokenizer(config.vision)
        root.vte = _embedding(VisualEmbedding, config.vision.vocab_size, config.hidden_size)
        root.visual_generator = _children(backbone=YakTransformer(config.yak), vae=_vae(config.vae))
    return root
