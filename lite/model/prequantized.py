"""Pre-quantized checkpoints: the one on-disk format for weights that were quantized once.

A folder holds `quantized-0000N.safetensors` shards (quantized payloads keyed `<module>.<part>`, plus
every unquantized tensor in its storage dtype), the source's config/tokenizer/preprocessor files, and
`ovis_lite_quant.json`, the manifest (written last, so an interrupted run is never mistaken for a
checkpoint). Loading goes through the same streaming loop as any checkpoint
(`lite.model.checkpoint.stream_into_model`), with a placer that restores each module as soon as
its payload has arrived: no full-precision weight is ever read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from offload.accounting import module_nbytes
from quant import (Int8VisualEmbedding, LayerReport, QuantFormatError, dtype_from_name, dtype_name,
                   export_quantized, layer_kind, restore_quantized)
from quant.backends.base import aligned
from quant.serialize import VERSION as QUANT_FORMAT_VERSION

from lite import __version__
from lite.errors import CheckpointError, OutputError
from lite.model.architecture import OVIS_U1
from lite.model.checkpoint import find_checkpoint, load_quantized_model, named_tensors, tie_weights
from lite.model.modeling_ovis_u1 import OvisU1
from lite.model.precision import Precision, QuantPolicy, as_policy
from lite.model.quantize import ModelQuantReport
from lite.model.config_fields import read_json_file
from lite.model.shards import INDEX_FILE, check_finite_tensor, contained_file, list_names

VTE_NAME = OVIS_U1.vte_module

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
    from safetensors.torch import save_file

    out = Path(out_dir)
    _check_out_dir(out)
    src = find_checkpoint(model_dir)
    if is_quantized_checkpoint(src):
        raise QuantizedCheckpointError(f"{src} is already a quantized checkpoint; quantize the original checkpoint")
    policy = as_policy(policy_name, device_type)
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


def read_checkpoint_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a pre-quantized checkpoint, structurally validated (one-line errors)."""
    path = Path(directory) / MANIFEST_FILE
    manifest = read_json_file(path, QuantizedCheckpointError, "quantized-checkpoint manifest")
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


class PrequantizedSource:
    """The tensors of a pre-quantized checkpoint, in file order, checked against its manifest."""

    def __init__(self, directory: Path, device: torch.device) -> None:
        self.directory = directory
        self.device = device
        self.manifest = read_checkpoint_manifest(directory)
        self.policy_name = str(self.manifest.get("policy"))
        config_file = directory / "config.json"
        try:
            config_hash = hashlib.sha256(config_file.read_bytes()).hexdigest()
        except OSError as exc:
            raise QuantizedCheckpointError(f"cannot read {config_file}: {exc.strerror or type(exc).__name__}") from None
        if config_hash != self.manifest.get("config_sha256"):
            raise QuantizedCheckpointError(f"{directory}: config.json does not match the one {MANIFEST_FILE} was "
                                           "written for; re-run ovis-lite quantize")
        self.by_file: dict[Path, list[str]] = {}
        self.headers: dict[str, tuple[str, tuple[int, ...]]] = {}
        for key, fname in self.manifest["weight_map"].items():
            if not isinstance(key, str) or not isinstance(fname, str):
                raise QuantizedCheckpointError(f"{directory}: {MANIFEST_FILE} weight_map must map names to file names")
            try:
                contained_file(directory, fname, f"shard named in {MANIFEST_FILE}")
            except CheckpointError as exc:
                raise QuantizedCheckpointError(str(exc)) from None
            self.by_file.setdefault(directory / fname, []).append(key)
        for file, keys in self.by_file.items():
            if not file.is_file():
                raise QuantizedCheckpointError(f"shard {file.name} named in {MANIFEST_FILE} is missing from {directory}")
            try:
                with safe_open(str(file), framework="pt") as f:
                    stored = set(f.keys())
                    for key in keys:
                        if key in stored:
                            sl = f.get_slice(key)
                            self.headers[key] = (sl.get_dtype(), tuple(sl.get_shape()))
            except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
                raise QuantizedCheckpointError(f"shard {file} is corrupt ({str(exc).splitlines()[0]})") from None
        missing = sorted(k for k in self.manifest["weight_map"] if k not in self.headers)
        if missing:
            raise QuantizedCheckpointError(f"{len(missing)} tensor(s) listed in {MANIFEST_FILE} are not in their "
                                           f"shard: {list_names(missing)}")
        self.unquantized: dict[str, str] = self.manifest["unquantized"]

    def validate(self, model: OvisU1) -> None:
        names = {n for n, _ in named_tensors(model)}
        bad = [n for n in self.unquantized if n not in names]
        if bad:
            raise QuantizedCheckpointError(f"{self.directory}: {MANIFEST_FILE} lists {len(bad)} tensor(s) the model "
                                           f"does not have: {list_names(sorted(bad))}")
        short = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
        for name, dname in self.unquantized.items():
            stored = self.headers.get(name, ("?", ()))[0]
            if short.get(dname, dname) != stored:
                raise QuantizedCheckpointError(f"{self.directory}: {name} is stored as {stored} but {MANIFEST_FILE} "
                                               f"says {dname}")

    def dtype_for(self, name: str) -> torch.dtype:
        return dtype_from_name(self.unquantized[name])

    def make_placer(self, model: OvisU1) -> "PrequantizedPlacer":
        return PrequantizedPlacer(self.directory, self.manifest, self.device)

    def __len__(self) -> int:
        return len(self.headers)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for file, keys in self.by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for key in sorted(keys):
                    tensor = f.get_tensor(key)
                    check_finite_tensor(key, tensor, file)
                    yield key, tensor


class PrequantizedPlacer:
    """Collects each module's payload as it streams in and restores the module once it is complete.

    An int8 embedding and the heads tied to it form one group (the heads read its payload).
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], device: torch.device) -> None:
        self.directory = directory
        self.device = device
        self.manifest = manifest
        entries: dict[str, dict[str, Any]] = manifest["modules"]
        tied = {n: e for n, e in entries.items() if isinstance(e, dict) and e.get("tied_to")}
        self.groups: dict[str, dict[str, dict[str, Any]]] = {}
        for name, entry in entries.items():
            if name not in tied:
                self.groups[name] = {name: entry, **{n: e for n, e in tied.items() if e.get("tied_to") == name}}
        if sum(len(g) for g in self.groups.values()) != len(entries):
            raise QuantizedCheckpointError(f"{directory}: {MANIFEST_FILE} ties a head to an embedding it does not list")
        for name, entry in manifest["lite_modules"].items():
            if name != VTE_NAME or entry.get("kind") != "vte":
                raise QuantizedCheckpointError(f"{directory}: unknown entry {name!r} in {MANIFEST_FILE}")
        self.owner: dict[str, str] = {}  # tensor key -> the group (or lite module) it belongs to
        for group_name, group in self.groups.items():
            for name, entry in group.items():
                parts = entry.get("tensors", []) if isinstance(entry, dict) else []
                for part in parts if isinstance(parts, list) else []:
                    self.owner[f"{name}.{part}"] = group_name
        for name in manifest["lite_modules"]:
            for part in ("qweight", "scale"):
                self.owner[f"{name}.{part}"] = name
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.needed = {g: {k for k, o in self.owner.items() if o == g} for g in {*self.groups, *manifest["lite_modules"]}}
        self.report = ModelQuantReport(str(manifest.get("policy")))

    def __call__(self, model: OvisU1, name: str, tensor: torch.Tensor) -> bool:
        group = self.owner.get(name)
        if group is None:
            return False
        parts = self.pending.setdefault(group, {})
        parts[name] = tensor
        if parts.keys() >= self.needed[group]:
            del self.pending[group]
            if group in self.groups:
                self._restore(model, group, parts)
            else:
                self._restore_vte(model, group, parts)
        return True

    def _restore(self, model: OvisU1, group_name: str, tensors: dict[str, torch.Tensor]) -> None:
        group = self.groups[group_name]
        try:
            restore_quantized(model, tensors, group, self.device)
        except QuantFormatError as exc:
            raise QuantizedCheckpointError(f"{self.directory}: {exc}") from None
        for name, entry in group.items():
            new = model.get_submodule(name)
            kind = layer_kind(new)
            self.report.layers.append(LayerReport(name, entry["format"], kind.format if kind else "?",
                                                  kind.backend if kind else "?", kind.group_size if kind else None,
                                                  tuple(entry["shape"]), 0, module_nbytes(new)))

    def _restore_vte(self, model: OvisU1, name: str, tensors: dict[str, torch.Tensor]) -> None:
        entry = self.manifest["lite_modules"][name]
        vte = model.get_submodule(name)
        v, d = entry.get("shape", [0, 0])
        if (v, d) != (vte.num_embeddings, vte.embedding_dim):
            raise QuantizedCheckpointError(f"{self.directory}: vte is {[v, d]} in {MANIFEST_FILE} but "
                                           f"{[vte.num_embeddings, vte.embedding_dim]} in config.json")
        q, s = tensors[f"{name}.qweight"], tensors[f"{name}.scale"]
        if q.dtype != torch.int8 or tuple(q.shape) != (v, d) or s.dtype != torch.float32 or tuple(s.shape) != (v,):
            raise QuantizedCheckpointError(f"{self.directory}: vte payload does not match {MANIFEST_FILE}")
        setattr(model, name, Int8VisualEmbedding(aligned(q).to(self.device), aligned(s).to(self.device),
                                                 dtype_from_name(entry["compute_dtype"])))

    def finish(self, model: OvisU1) -> None:
        if self.pending:
            raise QuantizedCheckpointError(f"{self.directory}: payload incomplete for "
                                           f"{list_names(sorted(self.pending))}")
        if not self.manifest.get("tied_head"):
            tie_weights(model)
