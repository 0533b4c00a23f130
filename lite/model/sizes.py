"""Sizes of every component, computed on the `meta` device: no weight is ever read."""

from __future__ import annotations

from typing import Any

import torch

from lite.model.config import OvisU1Config
from lite.model.modeling_ovis_u1 import COMPONENTS, OvisU1, component_of


def meta_model(config: OvisU1Config) -> OvisU1:
    with torch.device("meta"):
        return OvisU1(config)


def inspect_config(config: OvisU1Config, tensors: bool = False, bytes_per_param: int = 2) -> dict[str, Any]:
    """{"components": {name: {"params", "bytes"}}, "total_params", "total_bytes", ["tensors"]}.

    Parameters are counted once, so the tied LM head is not counted twice.
    """
    model = meta_model(config)
    comps: dict[str, dict[str, int]] = {c: {"params": 0, "bytes": 0} for c in COMPONENTS}
    for name, p in model.named_parameters():  # named_parameters() yields a tied tensor once
        comp = comps[component_of(name)]
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
