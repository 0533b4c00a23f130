"""Pre-quantized checkpoints: export payloads + a JSON-able manifest, restore without fp weights.

Tensors are keyed `<module>.<component>`; the manifest maps each module name to its format,
backend, shape, dtypes and component list. Files are written with safetensors only (never
pickle). Portability: quanto and torch-int8 payloads restore on any device (a quanto int8
payload becomes a torch Int8Linear where quanto is missing); bnb nf4/fp4 payloads need
bitsandbytes on the target device, otherwise `QuantFormatError` says so.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import torch
from torch import nn

from . import bnb_backend, quanto_backend
from .errors import QuantFormatError
from .int8 import SCALE_DTYPE, Int8Embedding, Int8Linear
from .spec import BACKEND_FORMATS, FORMATS, dtype_from_name, dtype_name

MANIFEST_KEY = "ovis_lite.quant.manifest"
VERSION_KEY = "ovis_lite.quant.version"
VERSION = "1"

Shape = tuple[int, ...]


def _entry_for(name: str, module: nn.Module, emb_names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    if isinstance(module, Int8Embedding):
        tensors = {"qweight": module.qweight, "scale": module.scale.to(SCALE_DTYPE)}
        fields: dict[str, Any] = {"kind": "embedding", "format": "int8", "backend": "torch",
                                  "shape": [module.num_embeddings, module.embedding_dim],
                                  "compute_dtype": dtype_name(module.compute_dtype), "padding_idx": module.padding_idx}
    elif isinstance(module, Int8Linear):
        shared = emb_names.get(id(module.qweight))
        fields = {"kind": "linear", "format": "int8", "backend": "torch",
                  "shape": [module.out_features, module.in_features], "compute_dtype": dtype_name(module.compute_dtype)}
        if shared is not None:
            fields["tied_to"] = shared
            tensors = {} if module.bias is None else {"bias": module.bias.data}
        else:
            tensors = {"qweight": module.qweight, "scale": module.scale.to(SCALE_DTYPE)}
            if module.bias is not None:
                tensors["bias"] = module.bias.data
    elif quanto_backend.owns(module) and getattr(module.weight, "_data", None) is not None:
        tensors, fields = quanto_backend.export(module)
        fields.update(kind="linear", backend="quanto", shape=[module.out_features, module.in_features])
    elif bnb_backend.owns(module) and getattr(module.weight, "quant_state", None) is not None:
        tensors, fields = bnb_backend.export(module)
        fields.update(kind="linear", backend="bnb", shape=[module.out_features, module.in_features])
    else:
        return None
    fields["bias"] = "bias" in tensors
    fields["tensors"] = sorted(tensors)
    return tensors, fields


def export_quantized(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """(tensors, manifest entries) for every quantized layer under `module` (plain layers are skipped).

    A head sharing an Int8Embedding's payload is exported as `tied_to` with no weight tensors.
    """
    named = list(module.named_modules())
    emb_names = {id(m.qweight): n for n, m in named if isinstance(m, Int8Embedding)}
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, sub in named:
        found = _entry_for(name, sub, emb_names)
        if found is None:
            continue
        payload, fields = found
        entries[name] = fields
        prefix = f"{name}." if name else ""
        for comp, t in payload.items():
            tensors[prefix + comp] = t.detach()
    return tensors, entries


def _expected(entry: Mapping[str, Any]) -> dict[str, tuple[Shape, torch.dtype]]:
    """Component -> (shape, dtype) a valid payload must have; derived from the manifest alone."""
    n, k = entry["shape"]
    backend, fmt = entry["backend"], entry["format"]
    if entry.get("kind") == "embedding":
        return {"qweight": ((n, k), torch.int8), "scale": ((n,), SCALE_DTYPE)}
    if backend == "torch":
        cd = dtype_from_name(entry["compute_dtype"])
        out = {} if entry.get("tied_to") else {"qweight": ((n, k), torch.int8), "scale": ((n,), SCALE_DTYPE)}
        if entry["bias"]:
            out["bias"] = ((n,), cd)
        return out
    if backend == "quanto":
        dt = dtype_from_name(entry["dtype"])
        if fmt == "int4":
            gs = entry.get("group_size")
            rows, cols = (n * k // gs, gs) if gs else (n, k)
            out = {"qweight": ((math.ceil(rows / 2), cols), torch.uint8), "scale": ((rows, 1), dt),
                   "shift": ((rows, 1), dt)}
        else:
            out = {"qweight": ((n, k), torch.int8 if fmt == "int8" else torch.float8_e4m3fn), "scale": ((n, 1), dt)}
        if entry["bias"]:
            out["bias"] = ((n,), dt)
        return out
    blocks = math.ceil(n * k / int(entry["blocksize"]))
    out = {"qweight": ((math.ceil(n * k / 2), 1), torch.uint8), "quant_map": ((16,), torch.float32)}
    if entry["double_quant"]:
        out["absmax"] = ((blocks,), torch.uint8)
        out["nested_absmax"] = ((math.ceil(blocks / int(entry["nested_blocksize"])),), torch.float32)
        out["nested_quant_map"] = ((256,), torch.float32)
        out["nested_offset"] = ((), torch.float32)
    else:
        out["absmax"] = ((blocks,), torch.float32)
    if entry["bias"]:
        out["bias"] = ((n,), dtype_from_name(entry["compute_dtype"]))
    return out


def _check_entry(name: str, entry: Any) -> None:
    if not isinstance(entry, Mapping):
        raise QuantFormatError(f"module {name!r}: manifest entry is not an object")
    fmt, backend = entry.get("format"), entry.get("backend")
    if fmt not in FORMATS or backend not in BACKEND_FORMATS or fmt not in BACKEND_FORMATS[backend]:
        raise QuantFormatError(f"module {name!r}: unknown format/backend {fmt!r}/{backend!r} in manifest")
    shape = entry.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise QuantFormatError(f"module {name!r}: manifest shape {shape!r} is not [out, in]")
    if entry.get("kind") not in ("linear", "embedding"):
        raise QuantFormatError(f"module {name!r}: unknown kind {entry.get('kind')!r} in manifest")


def _payload(name: str, entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = f"{name}." if name else ""
    try:
        expected = _expected(entry)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise QuantFormatError(f"module {name!r}: manifest entry is incomplete or invalid ({exc!r})") from None
    payload: dict[str, torch.Tensor] = {}
    for comp, (shape, dtype) in expected.items():
        key = prefix + comp
        if key not in tensors:
            raise QuantFormatError(f"module {name!r}: tensor {key!r} is missing from the checkpoint")
        t = tensors[key]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise QuantFormatError(f"module {name!r}: tensor {key!r} is {t.dtype} {tuple(t.shape)}, "
                                   f"manifest implies {dtype} {shape}")
        payload[comp] = _aligned(t)
    return payload


def _aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """Copy a CPU tensor whose data is not `alignment`-byte aligned (safetensors mmaps only promise 8).

    Why: torch 2.13's `_weight_int8pack_mm` (quanto's CPU int8 matmul) segfaults on int8 weights
    at an address that is 8- but not 64-aligned. Aligned tensors stay zero-copy.
    """
    if t.device.type == "cpu" and t.numel() and t.data_ptr() % alignment:
        return t.clone()
    return t


def _check_target(name: str, entry: Mapping[str, Any], target: nn.Module) -> None:
    n, k = entry["shape"]
    if entry["kind"] == "embedding":
        have = (getattr(target, "num_embeddings", None), getattr(target, "embedding_dim", None))
    else:
        have = (getattr(target, "out_features", None), getattr(target, "in_features", None))
    if have != (n, k):
        raise QuantFormatError(f"module {name!r}: model layer {type(target).__name__} has shape {list(have)}, "
                               f"checkpoint has {[n, k]}")


def _build(name: str, entry: Mapping[str, Any], payload: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    backend, fmt = entry["backend"], entry["format"]
    if backend == "torch":
        cd = dtype_from_name(entry["compute_dtype"])
        p = {c: t.to(device) for c, t in payload.items()}
        if entry["kind"] == "embedding":
            return Int8Embedding(p["qweight"], p["scale"], entry.get("padding_idx"), cd)
        return Int8Linear(p["qweight"], p["scale"], p.get("bias"), cd)
    if backend == "quanto":
        why = quanto_backend.unavailable_reason(device)
        if why is None:
            return quanto_backend.restore(dict(entry), payload, device)
        if fmt == "int8":  # same math: int8 rows times a per-row scale
            dt = dtype_from_name(entry["dtype"])
            return Int8Linear(payload["qweight"].to(device), payload["scale"].reshape(-1).to(device, SCALE_DTYPE),
                              None if "bias" not in payload else payload["bias"].to(device), dt)
        raise QuantFormatError(f"module {name!r}: quanto {fmt} payload cannot load on {device} ({why}); "
                               "install optimum-quanto or re-export with format int8")
    why = bnb_backend.unavailable_reason(device)
    if why is not None:
        raise QuantFormatError(f"module {name!r}: bnb {fmt} payload cannot load on {device} ({why}); "
                               "load it where bitsandbytes runs (cpu/cuda/xpu) or re-export with format int4 (quanto)")
    return bnb_backend.restore(dict(entry), payload, device)


def restore_quantized(module: nn.Module, tensors: Mapping[str, torch.Tensor],
                      manifest_entries: Mapping[str, Mapping[str, Any]],
                      device: torch.device | str = "cpu") -> list[str]:
    """Swap each layer named in the manifest (plain, possibly on `meta`) for its quantized payload.

    No full-precision weight is created. Every entry is validated before anything is replaced,
    so a corrupt manifest leaves the model untouched. Returns the names restored.
    """
    target_device = torch.device(device)
    plans: list[tuple[str, Mapping[str, Any], dict[str, torch.Tensor]]] = []
    for name, entry in manifest_entries.items():
        _check_entry(name, entry)
        try:
            target = module.get_submodule(name) if name else module
        except AttributeError:
            raise QuantFormatError(f"module {name!r}: named in the manifest but not present in the model") from None
        if target is module:
            raise QuantFormatError(f"module {name!r}: cannot replace the root module in place")
        _check_target(name, entry, target)
        tied = entry.get("tied_to")
        if tied is not None:
            src = manifest_entries.get(tied)
            if src is None or src.get("kind") != "embedding" or list(src.get("shape", [])) != list(entry["shape"]):
                raise QuantFormatError(f"module {name!r}: tied_to {tied!r} is not a matching embedding in the manifest")
        plans.append((name, entry, _payload(name, entry, tensors)))
    built: dict[str, nn.Module] = {}
    for name, entry, payload in sorted(plans, key=lambda p: p[1].get("tied_to") is not None):
        if entry.get("tied_to") is not None:
            emb = built[entry["tied_to"]]
            assert isinstance(emb, Int8Embedding)
            new = emb.tied_linear(entry["tied_to"])
            if "bias" in payload:
                new.bias = nn.Parameter(payload["bias"].to(target_device), requires_grad=False)
        else:
            new = _build(name, entry, payload, target_device)
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, new)
        built[name] = new
    return [name for name, _, _ in plans]


def save_quantized(path: str | os.PathLike[str], module: nn.Module, metadata: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Write every quantized layer of `module` to one safetensors file, manifest in its metadata."""
    from safetensors.torch import save_file

    tensors, entries = export_quantized(module)
    meta = dict(metadata or {})
    meta[MANIFEST_KEY] = json.dumps(entries, sort_keys=True)
    meta[VERSION_KEY] = VERSION
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.fspath(path), metadata=meta)
    return entries


def read_manifest(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The manifest stored in a file written by `save_quantized` (reads the header only)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
    if MANIFEST_KEY not in meta:
        raise QuantFormatError(f"{os.fspath(path)}: no {MANIFEST_KEY!r} metadata; not an ovis-lite quantized file")
    if meta.get(VERSION_KEY) != VERSION:
        raise QuantFormatError(f"{os.fspath(path)}: quant format version {meta.get(VERSION_KEY)!r}, expected {VERSION!r}")
    try:
        return json.loads(meta[MANIFEST_KEY])
    except json.JSONDecodeError as exc:
        raise QuantFormatError(f"{os.fspath(path)}: manifest is not valid JSON ({exc.msg})") from None


def load_quantized(path: str | os.PathLike[str], module: nn.Module, device: torch.device | str = "cpu") -> list[str]:
    """Restore `module`'s quantized layers from `path` (memory-mapped; payloads are not copied on CPU)."""
    from safetensors.torch import load_file

    entries = read_manifest(path)
    return restore_quantized(module, load_file(os.fspath(path)), entries, device)
