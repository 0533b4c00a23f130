"""Pre-quantized checkpoints: the one on-disk format for weights that were quantized once, and reading it.

A folder holds `quantized-0000N.safetensors` shards (quantized payloads keyed `<module>.<part>`, plus
every unquantized tensor in its storage dtype), the source's config/tokenizer/preprocessor files, and
`ovis_lite_quant.json`, the manifest (written last, so an interrupted run is never mistaken for a
checkpoint). Loading goes through the same streaming loop as any checkpoint
(`lite.model.checkpoint.stream_into_model`), with a placer that restores each module as soon as
its payload has arrived: no full-precision weight is ever read. Writing one is
`lite.model.prequantized_save` (it loads through `lite.model.load_quantized`, which reads through this module).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from offload.accounting import module_nbytes
from quant import Int8VisualEmbedding, LayerReport, QuantFormatError, dtype_from_name, layer_kind, restore_quantized
from quant.backends.base import aligned
from quant.serialize import VERSION as QUANT_FORMAT_VERSION

from lite.errors import CheckpointError
from lite.model.architecture import OVIS_U1
from lite.model.checkpoint import MANIFEST_FILE, named_tensors, tie_weights
from lite.model.config_fields import read_json_file
from lite.model.modeling_ovis_u1 import OvisU1
from lite.model.quantize import ModelQuantReport
from lite.model.shards import check_finite_tensor, contained_file, list_names

VTE_NAME = OVIS_U1.vte_module

MANIFEST_FORMAT = "ovis-lite-quantized-checkpoint"
MANIFEST_VERSION = 1


class QuantizedCheckpointError(CheckpointError):
    """A pre-quantized checkpoint whose manifest is corrupt, mismatched, or unportable to this device."""


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
