"""Writing a pre-quantized checkpoint (the format and its reader: `lite.model.prequantized`).

The source is loaded through the same streaming quantizer a run uses (`lite.model.load_quantized`), then every
payload is exported and written in shards, the manifest last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from quant import Int8VisualEmbedding, dtype_name, export_quantized
from quant.serialize import VERSION as QUANT_FORMAT_VERSION

from lite import __version__
from lite.errors import OutputError
from lite.model.architecture import OVIS_U1
from lite.model.checkpoint import MANIFEST_FILE, CheckpointKind, checkpoint_kind, find_checkpoint, named_tensors
from lite.model.load_quantized import load_quantized_model
from lite.model.precision import Precision, QuantPolicy, as_policy
from lite.model.prequantized import MANIFEST_FORMAT, MANIFEST_VERSION, VTE_NAME, QuantizedCheckpointError
from lite.model.shards import INDEX_FILE

SHARD_BYTES = 1 << 30
COPIED_FILES = ("config.json", "preprocessor_config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                "chat_template.json", "chat_template.jinja")


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
    return {"ovis_lite": __version__, "quant_format": QUANT_FORMAT_VERSION, "torch": torch.__version__}


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"{out} exists and is not empty; refusing to overwrite it (choose a new --out folder)")


def save_quantized_checkpoint(model_dir: str | os.PathLike[str] | None, policy_name: Precision | QuantPolicy,
                              out_dir: str | os.PathLike[str], device_type: str = "cpu",
                              progress: bool = False) -> dict[str, Any]:
    """Quantize `model_dir` with a precision table (or policy) and write a pre-quantized checkpoint to `out_dir`.

    `device_type` is the device the checkpoint is meant for (it picks the backends: "cuda" gives
    bnb NF4 for 4-bit, anything else quanto int4); quantization itself runs on the CPU, streaming.
    Writes `quantized-0000N.safetensors` shards (quantized payloads keyed `<module>.<part>` plus
    every unquantized tensor in its storage dtype), copies config/tokenizer/preprocessor files and
    finally `ovis_lite_quant.json` (written last, so an interrupted run is not mistaken for a
    checkpoint). Never overwrites: a non-empty `out_dir` raises OutputError. Returns the manifest.
    """
    out = Path(out_dir)
    _check_out_dir(out)
    src = find_checkpoint(model_dir)
    if checkpoint_kind(src) is CheckpointKind.PREQUANTIZED:
        raise QuantizedCheckpointError(f"{src} is already a quantized checkpoint; quantize the original checkpoint")
    policy = as_policy(policy_name, device_type)
    model, report = load_quantized_model(src, policy, device="cpu", progress=progress, kind=CheckpointKind.PLAIN)
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
    for name, t in named_tensors(model, quantized):
        if name in OVIS_U1.tied_weights_keys:
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
        "tied_head": OVIS_U1.embed_module in entries, "weight_map": weight_map,
        "component_bytes": report.component_bytes,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest
