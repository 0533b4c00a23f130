"""A complete full-size Ovis-U1-3B checkpoint with random weights: the one writer every benchmark shares.

Random weights cost the same to load, convert and run as the real ones, so this stands in for the
7 GB download on machines that cannot fetch it. The layout is the Hugging Face one of
AIDC-AI/Ovis-U1-3B: `config.json`, `preprocessor_config.json`, the tokenizer files (a byte-level BPE
of the real size, 151,643 tokens and the real special-token ids), two safetensors shards split at
Hugging Face's default 5 GB, and `model.safetensors.index.json`. The tied `llm.lm_head.weight` is not
stored (docs/ovis_u1_spec.md §1).

The shards are streamed: each tensor is drawn in row blocks of at most `BLOCK_BYTES` and appended to
the file, so the writer's peak RSS stays near the interpreter's own (~0.5 GB) whatever the shard
size. Every tensor has its own generator, seeded from the seed and the tensor's name, so its values do
not depend on which other tensors are written. A `.complete` file is written last: readers wait for it.
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import zlib
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch

from lite.model.architecture import OVIS_U1
from lite.model.config import parse_config
from lite.model.shards import INDEX_FILE
from lite.model.sizes import meta_model
from lite.model.tiny import init_mean_std, real_config_template, train_byte_bpe

#: Regular (non-special) tokens of the Qwen2/Qwen3 vocabulary; the special tokens follow from this id.
QWEN_REGULAR_TOKENS = 151_643
#: Hugging Face's default `max_shard_size` ("5GB", decimal).
SHARD_BYTES = 5 * 10**9
#: The most bytes of one tensor drawn at a time (bounds the writer's working memory).
BLOCK_BYTES = 64 << 20
COMPLETE_MARKER = ".complete"
_SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_PACKAGE_FILES = ("preprocessor_config.json", "tokenizer_config.json", "special_tokens_map.json",
                  "added_tokens.json")


def full_tensor_shapes() -> dict[str, tuple[int, ...]]:
    """Every stored tensor of the real checkpoint and its shape, in the model's state-dict order."""
    model = meta_model(parse_config(real_config_template()))
    return {k: tuple(t.shape) for k, t in model.state_dict().items()
            if k not in OVIS_U1.tied_weights_keys and not k.endswith("inv_freq")}


def write_full_tokenizer(out: Path, size: int = QWEN_REGULAR_TOKENS, seed: int = 0) -> None:
    """vocab.json + merges.txt with `size` regular tokens, so the real special-token ids apply unchanged.

    A BPE trained on a small corpus (so text splits like text), then grown with merges of a token and a
    byte symbol to the real vocabulary size (so loading it costs what the real one costs).
    """
    vocab, merges = train_byte_bpe()
    alphabet = [t for t in vocab if len(t) == 1]
    random.Random(seed).shuffle(alphabet)
    tokens = list(vocab)
    for left in tokens:  # grows while it is walked: longer tokens are built from the new ones
        for right in alphabet:
            if len(tokens) >= size:
                break
            if left + right not in vocab:
                vocab[left + right] = len(tokens)
                tokens.append(left + right)
                merges.append(f"{left} {right}")
        if len(tokens) >= size:
            break
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _tensor_seed(seed: int, name: str) -> int:
    """A 32-bit seed from both (torch's CPU generator keeps only the low 32 bits of a seed)."""
    return zlib.crc32(name.encode(), seed & 0xFFFFFFFF)


def _write_random_tensor(f, name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> None:
    """Append `name`'s random values to the open file, drawn block by block along the first dimension."""
    mean, std = init_mean_std(name, shape)
    gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    rows = shape[0] if shape else 1
    step = max(1, BLOCK_BYTES // (4 * row))
    for start in range(0, rows, step):
        n = min(step, rows - start)
        block = torch.randn(n * row, generator=gen).mul_(std).add_(mean).to(dtype)
        f.write(block.view(torch.uint8).numpy().data)


def write_shard(path: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype], seed: int) -> int:
    """One safetensors file, header first, then each tensor streamed; returns its data bytes.

    The format (safetensors' documented layout): 8-byte little-endian header length, a JSON header
    of {name: {dtype, shape, data_offsets}} padded with spaces to 8 bytes, then the raw data.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * dtypes[name].itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPE[dtypes[name]], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape in shapes.items():
            _write_random_tensor(f, name, shape, dtypes[name], seed)
    return offset


def plan_shards(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype],
                shard_bytes: int = SHARD_BYTES) -> list[dict[str, tuple[int, ...]]]:
    """Split in order, a new shard when the next tensor would pass `shard_bytes` (as save_pretrained does)."""
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * dtypes[name].itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += nbytes
    return shards


def stored_dtypes(shapes: dict[str, tuple[int, ...]], generator_fp32: bool) -> dict[str, torch.dtype]:
    """bf16 everywhere (the config's torch_dtype), or the generator in fp32 (its sub-config's torch_dtype)."""
    return {k: torch.float32 if generator_fp32 and k.startswith("visual_generator.") else torch.bfloat16
            for k in shapes}


def write_fullsize(out: str | os.PathLike[str], seed: int = 0, generator_fp32: bool = False,
                   progress: Callable[[str], None] | None = None) -> Path:
    """Write the complete checkpoint into `out` (new or empty), `.complete` last; returns its path."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _msg: None)
    for name in _PACKAGE_FILES:
        (out / name).write_text(resources.files("lite").joinpath(f"data/{name}").read_text())
    (out / "config.json").write_text(json.dumps(real_config_template(), indent=2))
    write_full_tokenizer(out, seed=seed)
    say("tokenizer written")
    shapes = full_tensor_shapes()
    dtypes = stored_dtypes(shapes, generator_fp32)
    shards = plan_shards(shapes, dtypes)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_shard(out / fname, shard, dtypes, seed)
        weight_map.update({k: fname for k in shard})
        say(f"{fname} written ({total / 1e9:.2f} GB so far)")
    (out / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (out / COMPLETE_MARKER).write_text("")
    return out
