"""Sizes of every component, and the exact bytes of a precision policy, computed on the `meta` device:
no weight is ever read (`ovis-lite inspect`, the planner's unit sizes). Sizing builds the config-arithmetic
skeleton (`lite/model/skeleton.py`), so it imports no transformers/diffusers modeling code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from offload.accounting import module_nbytes
from quant import QuantSpec, embedding_layout_nbytes, layout_nbytes
from quant.backends.base import element_size

from lite.model.architecture import COMPONENTS, OVIS_U1
from lite.model.config import OvisU1Config
from lite.model.modeling_ovis_u1 import OvisU1
from lite.model.precision import Precision, QuantPolicy, as_policy
from lite.model.quantize import plan_model
from lite.model.skeleton import skeleton_model


def meta_model(config: OvisU1Config) -> OvisU1:
    """The real model on `meta` (for tools that go on to materialise parts of it); sizing uses the skeleton."""
    with torch.device("meta"):
        return OvisU1(config)


def inspect_config(config: OvisU1Config, tensors: bool = False, bytes_per_param: int = 2) -> dict[str, Any]:
    """{"components": {name: {"params", "bytes"}}, "total_params", "total_bytes", ["tensors"]}.

    Parameters are counted once, so the tied LM head is not counted twice.
    """
    model = skeleton_model(config)
    comps: dict[str, dict[str, int]] = {c: {"params": 0, "bytes": 0} for c in COMPONENTS}
    for name, p in model.named_parameters():  # named_parameters() yields a tied tensor once
        comp = comps[OVIS_U1.component_of(name)]
        comp["params"] += p.numel()
        comp["bytes"] += p.numel() * bytes_per_param
    result: dict[str, Any] = {
        "components": comps,
        "total_params": sum(c["params"] for c in comps.values()),
        "total_bytes": sum(c["bytes"] for c in comps.values()),
    }
    if tensors:
        result["tensors"] = {k: list(v.shape) for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    return result


def format_inspect(result: dict[str, Any]) -> str:
    lines = [f"{'component':<12} {'params':>15} {'bf16 bytes':>15}"]
    for name, c in result["components"].items():
        lines.append(f"{name:<12} {c['params']:>15,} {c['bytes']:>15,}")
    lines.append(f"{'total':<12} {result['total_params']:>15,} {result['total_bytes']:>15,}")
    for name, shape in result.get("tensors", {}).items():
        lines.append(f"  {name} {shape}")
    return "\n".join(lines)


_BYTES_KEYS = ("params", "bytes", "packed", "scales", "zeros", "unquantized")


def _layout_device(spec: QuantSpec, device_type: str) -> str:
    # bnb's layout does not depend on the device, and bnb may be importable here without CUDA.
    return device_type if spec.backend == "quanto" and device_type in ("cpu", "cuda", "mps", "xpu") else "cpu"


def _leaf_bytes(model: OvisU1, policy: QuantPolicy) -> dict[str, dict[str, int]]:
    """{qualified module name: {params, packed, scales, zeros, unquantized}} for every module owning tensors.

    Quantized modules get their `layout_nbytes`/`embedding_layout_nbytes` (bias -> unquantized,
    quanto activation scales and bnb code tables -> scales); others count their own parameters at
    the policy's storage dtype. The tied lm_head owns nothing.
    """
    plan = plan_model(model, policy)
    out: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if name in plan:
            p = plan[name]
            n, k = p.shape
            if p.kind == "linear":
                assert p.spec is not None
                lay = layout_nbytes(n, k, p.bias, p.spec, p.spec.compute_dtype, _layout_device(p.spec, policy.device_type))
                out[name] = {"params": n * k + (n if p.bias else 0), "packed": lay["packed"],
                             "scales": lay["scales"] + lay["other"], "zeros": lay["zeros"], "unquantized": lay["bias"]}
            else:
                lay = embedding_layout_nbytes(n, k)
                out[name] = {"params": n * k, "packed": lay["packed"], "scales": lay["scales"] + lay["other"],
                             "zeros": 0, "unquantized": 0}
            continue
        parts = name.split(".")  # inside a quantized module: an ancestor is planned (depth checks, not all plans)
        if any(".".join(parts[:i]) in plan for i in range(1, len(parts))):
            continue
        own = [(f"{name}.{pn}" if name else pn, t) for pn, t in m.named_parameters(recurse=False)]
        own = [(pn, t) for pn, t in own if pn not in OVIS_U1.tied_weights_keys]
        bufs = list(m.named_buffers(recurse=False))
        if not own and not bufs:
            continue
        entry = {"params": 0, "packed": 0, "scales": 0, "zeros": 0, "unquantized": 0}
        for pn, t in own:
            entry["params"] += t.numel()
            dt = policy.dtype_for(pn) if t.is_floating_point() else t.dtype
            entry["unquantized"] += t.numel() * element_size(dt)
        for _, b in bufs:  # e.g. RoPE inv_freq (fp32, recomputed at load)
            entry["unquantized"] += b.numel() * b.element_size()
        out[name] = entry
    return out


def quantized_bytes(config: OvisU1Config, policy: QuantPolicy | Precision, device_type: str | None = None) -> dict[str, Any]:
    """Exact bytes per component of `config` quantized by `policy`, computed on a meta model.

    {"policy", "device_type", "components": {name: {"params", "bytes", "packed", "scales", "zeros",
    "unquantized"}}, "total_params", "total_bytes"}. packed = quantized weight payloads (and int8
    tables), scales = scales + quanto activation scales + bnb code tables, zeros = int4 shifts,
    unquantized = everything kept in bf16/fp16/fp32 (norms, excluded layers, biases, VAE).
    `device_type` resolves a Precision (default cpu); a QuantPolicy keeps its own.
    """
    policy = as_policy(policy, device_type or "cpu")
    model = skeleton_model(config)
    comps = {c: dict.fromkeys(_BYTES_KEYS, 0) for c in COMPONENTS}
    for name, entry in _leaf_bytes(model, policy).items():
        comp = comps[OVIS_U1.component_of(name)]
        for k in ("params", "packed", "scales", "zeros", "unquantized"):
            comp[k] += entry[k]
    for c in comps.values():
        c["bytes"] = c["packed"] + c["scales"] + c["zeros"] + c["unquantized"]
    return {"policy": policy.name, "device_type": policy.device_type, "formats": policy.formats(),
            "components": comps, "total_params": sum(c["params"] for c in comps.values()),
            "total_bytes": sum(c["bytes"] for c in comps.values())}


def module_bytes(model: OvisU1, policy: QuantPolicy | Precision) -> dict[str, int]:
    """Qualified module name -> bytes it owns under `policy` (works on a meta model)."""
    return {name: e["packed"] + e["scales"] + e["zeros"] + e["unquantized"]
            for name, e in _leaf_bytes(model, as_policy(policy, "cpu")).items()}


def make_sizeof(model: OvisU1, policy: QuantPolicy | Precision) -> Callable[[nn.Module], int]:
    """`sizeof(submodule) -> bytes` it occupies under `policy` (for the offload planner).

    Works on a meta model (bytes come from the quantized layouts, nothing is allocated) and on a
    loaded one: a submodule with real tensors is measured with `module_nbytes` (honest bytes of
    what it holds now). `model` must be the OvisU1 the submodules belong to.
    """
    policy = as_policy(policy, "cpu")
    leaves = _leaf_bytes(model, policy)
    names = {id(m): n for n, m in model.named_modules()}

    def sizeof(module: nn.Module) -> int:
        if any(t.device.type != "meta" for t in module.parameters()):
            return module_nbytes(module)
        name = names.get(id(module))
        if name is None:
            raise ValueError(f"{type(module).__name__} is not a submodule of this model")
        prefix = name + "." if name else ""
        return sum(e["packed"] + e["scales"] + e["zeros"] + e["unquantized"]
                   for n, e in leaves.items() if n == name or n.startswith(prefix) or not name)

    return sizeof


def format_quantized_bytes(result: dict[str, Any]) -> str:
    """A table of `quantized_bytes` output for the CLI."""
    lines = [f"policy {result['policy']} ({result['device_type']})",
             f"{'component':<12} {'format':<34} {'params':>14} {'bytes':>14} {'packed':>14} {'scales':>12} "
             f"{'zeros':>11} {'unquantized':>13}"]
    fmts = result.get("formats", {})
    for name, c in result["components"].items():
        fmt = fmts.get(name, "")
        if name == "llm" and "llm_embed" in fmts:
            fmt = f"{fmt}; embed {fmts['llm_embed']}"
        lines.append(f"{name:<12} {fmt[:34]:<34} {c['params']:>14,} {c['bytes']:>14,} {c['packed']:>14,} "
                     f"{c['scales']:>12,} {c['zeros']:>11,} {c['unquantized']:>13,}")
    lines.append(f"{'total':<12} {'':<34} {result['total_params']:>14,} {result['total_bytes']:>14,}")
    return "\n".join(lines)
