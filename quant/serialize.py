"""Quantized payloads for pre-quantized checkpoints: export tensors + JSON-able manifest entries, and
restore them without any full-precision weight.

Tensors are keyed `<module>.<component>`; each manifest entry names the module's backend, format,
shape, dtypes and components, and the backend says what a valid payload looks like. The caller
writes them (safetensors only, never pickle) in its own checkpoint layout. Portability: quanto and torch-int8 payloads restore on any device (a quanto int8
payload becomes a torch Int8Linear where quanto is missing); bnb nf4/fp4 payloads need
bitsandbytes on the target device, otherwise `QuantFormatError` says so.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .backends import REGISTRY, backend_of
from .backends.base import aligned
from .errors import QuantFormatError
from .int8 import Int8Embedding, Int8Linear
from .formats import FORMATS

VERSION = "1"


def _entry_for(name: str, module: nn.Module, emb_names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    backend = backend_of(module)
    if backend is None:
        return None
    shared = emb_names.get(id(module.qweight)) if isinstance(module, Int8Linear) else None
    tensors, fields = backend.export(module)
    if shared is not None:  # a head reading an Int8Embedding's payload stores nothing but its bias
        fields["tied_to"] = shared
        tensors = {k: v for k, v in tensors.items() if k == "bias"}
    shape = ([module.num_embeddings, module.embedding_dim] if isinstance(module, Int8Embedding)
             else [module.out_features, module.in_features])
    fields = {"kind": "linear", "backend": backend.name, "shape": shape, **fields}
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


def _check_entry(name: str, entry: Any) -> None:
    if not isinstance(entry, Mapping):
        raise QuantFormatError(f"module {name!r}: manifest entry is not an object")
    fmt, backend = entry.get("format"), entry.get("backend")
    if fmt not in FORMATS or backend not in REGISTRY or fmt not in REGISTRY[backend].formats:
        raise QuantFormatError(f"module {name!r}: unknown format/backend {fmt!r}/{backend!r} in manifest")
    shape = entry.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise QuantFormatError(f"module {name!r}: manifest shape {shape!r} is not [out, in]")
    if entry.get("kind") not in ("linear", "embedding"):
        raise QuantFormatError(f"module {name!r}: unknown kind {entry.get('kind')!r} in manifest")


def _payload(name: str, entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = f"{name}." if name else ""
    try:
        expected = REGISTRY[entry["backend"]].expected(entry)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise QuantFormatError(f"module {name!r}: manifest entry is incomplete or invalid ({exc!r})") from None
    payload: dict[str, torch.Tensor] = {}
    # a backend may name payload parts its kernels read at any alignment: those stay zero-copy mmaps
    keep = getattr(REGISTRY[entry["backend"]], "zero_copy_components", ())
    for comp, (shape, dtype) in expected.items():
        key = prefix + comp
        if key not in tensors:
            raise QuantFormatError(f"module {name!r}: tensor {key!r} is missing from the checkpoint")
        t = tensors[key]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise QuantFormatError(f"module {name!r}: tensor {key!r} is {t.dtype} {tuple(t.shape)}, "
                                   f"manifest implies {dtype} {shape}")
        payload[comp] = t if comp in keep else aligned(t)
    return payload


def _check_target(name: str, entry: Mapping[str, Any], target: nn.Module) -> None:
    n, k = entry["shape"]
    if entry["kind"] == "embedding":
        have = (getattr(target, "num_embeddings", None), getattr(target, "embedding_dim", None))
    else:
        have = (getattr(target, "out_features", None), getattr(target, "in_features", None))
    if have != (n, k):
        raise QuantFormatError(f"module {name!r}: model layer {type(target).__name__} has shape {list(have)}, "
                               f"checkpoint has {[n, k]}")


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
            try:
                new = REGISTRY[entry["backend"]].restore(entry, payload, target_device)
            except QuantFormatError as exc:
                raise QuantFormatError(f"module {name!r}: {exc}") from None
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, new)
        built[name] = new
    return [name for name, _, _ in plans]
