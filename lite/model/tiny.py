"""Seeded tiny random checkpoints in the exact Hugging Face layout of Ovis-U1-3B.

They have the real module tree, real tensor names, the real `config.json` structure (only sizes
changed), two safetensors shards with an index, a real byte-level BPE tokenizer and a
preprocessor config, so they load through the very same loader as the 7 GB checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from lite.model.config import parse_config
from lite.model.architecture import OVIS_U1
from lite.model.modeling_ovis_u1 import OvisU1

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
TINY_LLM_VOCAB = 512

_CORPUS = [
    "What is it? Describe each image. Generate an image.",
    "Describe the image by detailing the color, shape, size, texture, quantity, text, and spatial "
    "relationships of the objects:",
    "a red cat sitting on a blue chair near the window, add a hat to this cat.",
    "Image 1: Image 2: The quick brown fox jumps over the lazy dog. A photo of a mountain lake at dawn.",
    "user assistant think 0123456789 ,.;:!?'\"()[]{}<>-_/\\|@#$%^&*+=~` \n\t",
]


def real_config_template() -> dict[str, Any]:
    """The real Ovis-U1-3B config.json, shipped with the package."""
    return json.loads(resources.files("lite").joinpath("data/config.json").read_text())


def tiny_config_dict(vocab_size: int = TINY_LLM_VOCAB, bos_id: int = 0, eos_id: int = 0) -> dict[str, Any]:
    """The real config with small sizes; every structural key kept (sizes as in shared/golden)."""
    cfg = copy.deepcopy(real_config_template())
    cfg["hidden_size"] = 64
    cfg["torch_dtype"] = "float32"
    cfg["llm_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, max_window_layers=2, vocab_size=vocab_size,
                             bos_token_id=bos_id, eos_token_id=eos_id, _name_or_path="tiny-random-qwen3")
    vt = cfg["visual_tokenizer_config"]
    vt.update(vocab_size=256, min_pixels=3136, max_pixels=12544)
    vt["backbone_config"].update(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=56, min_pixels=3136, max_pixels=12544, _name_or_path="tiny-random-aimv2")
    for key in ("backbone_kwargs", "image_processor_new_kwargs"):
        vt[key].update(min_pixels=3136, max_pixels=12544)
    vg = cfg["visual_generator_config"]
    vg.update(hidden_size=48, num_heads=2, axes_dim=[4, 10, 10], depth=2, depth_single_blocks=2,
              context_in_dim=128, vec_in_dim=48, _name_or_path="tiny-random-yak")
    vg["vae_config"].update(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4, sample_size=64)
    return cfg


def train_byte_bpe() -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE trained offline in milliseconds: (vocab, merges) without special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    data = json.loads(tok.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return data["model"]["vocab"], merges


def write_tokenizer(out: Path) -> dict[str, int]:
    """vocab.json + merges.txt + tokenizer_config.json, as the real checkpoint ships them."""
    vocab, merges = train_byte_bpe()
    special_ids = {tok: len(vocab) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": not t.endswith("think>")}
               for t, i in special_ids.items()}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
        "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
        "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, indent=2))
    (out / "added_tokens.json").write_text(json.dumps(special_ids, indent=2))
    return special_ids


def _gain(name: str) -> float:
    if "mod" in name or "adaLN" in name:
        return 0.5
    if name.endswith("decoder.conv_out.weight"):
        return 0.6
    return 1.0


def init_mean_std(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of the normal a random parameter is drawn from, chosen so that no path is switched off
    (zero-init gates, CLS, pos_embed...) and activations keep their scale (1/sqrt(fan-in) for matrices)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("pos_embed", "cls_token") or name.endswith(("embed_tokens.weight", "vte.weight")):
        return 0.0, 0.5
    if len(shape) >= 2:
        return 0.0, _gain(name) / math.sqrt(math.prod(shape[1:]))
    if name.startswith("visual_tokenizer.head.1.weight"):
        return 2.0, 0.2
    if leaf == "bias":
        return 0.0, 0.1
    return 1.0, 0.15  # norm weights and QK-norm scales


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Draw every parameter from `init_mean_std` (one generator, in parameter order)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name in OVIS_U1.tied_weights_keys:
            continue
        mean, std = init_mean_std(name, tuple(p.shape))
        p.copy_(torch.randn(p.shape, generator=gen) * std + mean)


def _shards(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    understanding = {k: v for k, v in state.items() if not k.startswith("visual_generator.")}
    generation = {k: v for k, v in state.items() if k.startswith("visual_generator.")}
    return {"model-00001-of-00002.safetensors": understanding, "model-00002-of-00002.safetensors": generation}


def write_checkpoint(out: Path, model: torch.nn.Module, config: dict[str, Any], dtype: torch.dtype) -> None:
    """Shards + index + config.json, in the HF layout (tied lm_head not stored)."""
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()
             if k not in OVIS_U1.tied_weights_keys and not k.endswith("inv_freq")}
    total = 0
    weight_map: dict[str, str] = {}
    for fname, tensors in _shards(state).items():
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))


def make_tiny(out: str | os.PathLike[str], seed: int = 0, dtype: torch.dtype = torch.float32,
              overwrite: bool = False) -> Path:
    """Write a seeded random tiny Ovis-U1 checkpoint to `out` and return its path."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder or pass overwrite")
    out.mkdir(parents=True, exist_ok=True)
    special = write_tokenizer(out)
    cfg_dict = tiny_config_dict(TINY_LLM_VOCAB, bos_id=special["<|endoftext|>"], eos_id=special["<|im_end|>"])
    torch.manual_seed(seed)
    model = OvisU1(parse_config(cfg_dict))
    randomize_(model, seed)
    write_checkpoint(out, model, cfg_dict, dtype)
    pp = json.loads(resources.files("lite").joinpath("data/preprocessor_config.json").read_text())
    pp.update(min_pixels=3136, max_pixels=12544)
    (out / "preprocessor_config.json").write_text(json.dumps(pp, indent=2))
    return out
