"""`quantize(module, spec)`: swap matching nn.Linear descendants for quantized layers, in place."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from offload.accounting import module_nbytes

from .backends import is_plain_linear, layer_kind
from .linear import quantize_linear_from_weight
from .spec import QuantSpec


@dataclass(frozen=True)
class LayerReport:
    """One replaced (or cast, or skipped-on-purpose) layer."""

    name: str
    requested: str
    format: str
    backend: str
    group_size: int | None
    shape: tuple[int, int]
    bytes_before: int
    bytes_after: int


class LayerTotals:
    """Byte totals over a report's `layers` (shared by every report that lists quantized layers)."""

    layers: list[LayerReport]

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)


@dataclass
class QuantReport(LayerTotals):
    """Per-layer outcome of `quantize`, with honest byte counts (quant_state and inner tensors included)."""

    spec: QuantSpec
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def fallbacks(self) -> list[LayerReport]:
        """Layers whose backend/format differs from what was asked (auto chain fell through)."""
        return [r for r in self.layers if r.format != r.requested]

    def __str__(self) -> str:
        lines = [f"{'module':<48} {'req':>5} {'fmt':>5} {'backend':>7} {'group':>5} {'shape':>13} "
                 f"{'before':>12} {'after':>12}"]
        for r in self.layers:
            lines.append(f"{r.name:<48} {r.requested:>5} {r.format:>5} {r.backend:>7} {str(r.group_size or '-'):>5} "
                         f"{'x'.join(map(str, r.shape)):>13} {r.bytes_before:>12,} {r.bytes_after:>12,}")
        lines.append(f"{len(self.layers)} layers: {self.bytes_before:,} B -> {self.bytes_after:,} B")
        return "\n".join(lines)


def _parent_and_attr(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attr


def quantize(module: nn.Module, spec: QuantSpec, device: torch.device | str | None = None) -> QuantReport:
    """Replace every `nn.Linear` descendant selected by `spec` with its quantized version, in place.

    Layers are processed one at a time, so only one extra full-precision weight is alive at once.
    The root itself cannot be replaced in place: if `module` is an `nn.Linear`, a ValueError
    says to call `quantize_linear_from_weight(root.weight, root.bias, spec)` (or wrap it in
    `nn.Sequential`). Format "none" leaves layers untouched and reports nothing.
    `device` places the new layers (default: each weight's current device).
    """
    if isinstance(module, nn.Linear):
        raise ValueError("quantize() replaces child modules in place and the root is itself an nn.Linear; "
                         "use quantize_linear_from_weight(root.weight, root.bias, spec) or wrap it in nn.Sequential")
    report = QuantReport(spec)
    if spec.format == "none":
        return report
    targets = [(n, m) for n, m in module.named_modules()
               if n and is_plain_linear(m) and spec.matches(n)]
    for name, linear in targets:
        before = module_nbytes(linear)
        with torch.no_grad():
            new = quantize_linear_from_weight(linear.weight, linear.bias, spec, device, spec.compute_dtype)
        new.train(linear.training)
        parent, attr = _parent_and_attr(module, name)
        setattr(parent, attr, new)
        kind = layer_kind(new)
        assert kind is not None, f"built an unrecognised layer type {type(new).__name__}"
        report.layers.append(LayerReport(name, spec.format, kind.format, kind.backend, kind.group_size,
                                         (linear.out_features, linear.in_features), before, module_nbytes(new)))
        del linear, new
    return report
