"""Quantizing Ovis-U1 as a precision policy says: which module becomes what, for a loaded model or while
the checkpoint streams in (`StreamingQuantizer`, the loader's placer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from offload.accounting import module_nbytes
from quant import (QUANT_FORMATS, Int8Embedding, Int8VisualEmbedding, LayerReport, LayerTotals, QuantSpec,
                   is_plain_linear, layer_kind, quantize_linear_from_weight)

from lite.errors import CheckpointError
from lite.memory import trim_host_heap
from lite.model.architecture import OVIS_U1
from lite.model.checkpoint import set_tensor, tie_weights
from lite.model.precision import COMPONENT_ROOTS, Precision, QuantPolicy, as_policy

if TYPE_CHECKING:
    from lite.model.modeling_ovis_u1 import OvisU1

EMBED_NAME = OVIS_U1.embed_module
HEAD_NAME = OVIS_U1.head_module
VTE_NAME = OVIS_U1.vte_module


@dataclass(frozen=True)
class PlannedLayer:
    """One module the policy replaces: a Linear with a spec, or a table (embedding/VTE) at int8."""

    name: str  # qualified in OvisU1
    key: str  # policy key
    kind: str  # "linear" | "embedding" | "vte"
    spec: QuantSpec | None  # linear only
    shape: tuple[int, int]
    bias: bool


def plan_model(model: OvisU1, policy: QuantPolicy) -> dict[str, PlannedLayer]:
    """{qualified module name: PlannedLayer} for every module `policy` quantizes (works on meta)."""
    plan: dict[str, PlannedLayer] = {}
    for key in ("llm", "vision", "visual_head", "yak"):
        root_name = COMPONENT_ROOTS[key]
        root = model.get_submodule(root_name)
        for rel, m in root.named_modules():
            if not rel or not is_plain_linear(m):
                continue
            name = f"{root_name}.{rel}"
            if name == HEAD_NAME:
                continue  # the tied head follows llm_embed
            spec = policy.layer_spec(key, rel, m.out_features, m.in_features)
            if spec is not None and spec.format in QUANT_FORMATS:
                plan[name] = PlannedLayer(name, key, "linear", spec, (m.out_features, m.in_features),
                                          m.bias is not None)
    if policy.spec("llm_embed").format == "int8":
        emb = model.get_submodule(EMBED_NAME)
        if isinstance(emb, nn.Embedding):
            plan[EMBED_NAME] = PlannedLayer(EMBED_NAME, "llm_embed", "embedding", None,
                                            (emb.num_embeddings, emb.embedding_dim), False)
    if policy.spec("vte").format == "int8" and isinstance(model.vte, nn.Embedding):
        plan[VTE_NAME] = PlannedLayer(VTE_NAME, "vte", "vte", None,
                                      (model.vte.num_embeddings, model.vte.embedding_dim), False)
    return plan


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def _build_layer(p: PlannedLayer, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device,
                 policy: QuantPolicy, padding_idx: int | None = None) -> nn.Module:
    if p.kind == "linear":
        assert p.spec is not None
        return quantize_linear_from_weight(weight, bias, p.spec, device, p.spec.compute_dtype)
    if p.kind == "embedding":
        return Int8Embedding.from_weight(weight, device, padding_idx, policy.dtype)
    return Int8VisualEmbedding.from_weight(weight, device, policy.dtype)


@dataclass
class ModelQuantReport(LayerTotals):
    """What `quantize_model` / the streaming loader replaced, with honest bytes per layer and component."""

    policy: str
    layers: list[LayerReport] = field(default_factory=list)
    component_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.component_bytes.values())

    def formats(self) -> dict[str, int]:
        """{"int4/quanto": n_layers, ...}."""
        out: dict[str, int] = {}
        for r in self.layers:
            k = f"{r.format}/{r.backend}"
            out[k] = out.get(k, 0) + 1
        return out


def component_modules(model: OvisU1) -> dict[str, nn.Module]:
    """The six components' root modules (llm includes embed_tokens and lm_head)."""
    return OVIS_U1.component_modules(model)


def component_nbytes(model: OvisU1) -> dict[str, int]:
    """Honest bytes per component of a loaded (possibly quantized) model."""
    return {c: module_nbytes(m) for c, m in component_modules(model).items()}


def _layer_report(p: PlannedLayer, new: nn.Module, before: int) -> LayerReport:
    kind = layer_kind(new)
    fmt, backend, gs = (kind.format, kind.backend, kind.group_size) if kind else ("int8", "torch", None)
    requested = p.spec.format if p.spec is not None else "int8"
    return LayerReport(p.name, requested, fmt, backend, gs, p.shape, before, module_nbytes(new))


@torch.no_grad()
def quantize_model(model: OvisU1, policy: QuantPolicy | Precision, device: torch.device | str | None = None,
                   cast: bool = True) -> ModelQuantReport:
    """Quantize a loaded Ovis-U1 in place, one layer at a time, as `policy` says.

    With `cast` (default), every parameter that is not quantized is first cast to the policy's
    storage dtype (`policy.dtype`, VAE `policy.vae_dtype`), so the result equals
    `load_quantized_model` of the same checkpoint. Layers are built on `device` (default: where
    each weight lives). A `Precision` is resolved for that device's type.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    policy = as_policy(policy, dev.type)
    plan = plan_model(model, policy)
    if cast:
        for name, p in list(model.named_parameters()):
            want = policy.dtype_for(name)
            if p.is_floating_point() and p.dtype != want:
                set_tensor(model, name, p.detach().to(want))
        if isinstance(model.get_submodule(EMBED_NAME), nn.Embedding) and isinstance(model.llm.lm_head, nn.Linear):
            tie_weights(model)
    report = ModelQuantReport(policy.name)
    for name, p in plan.items():
        old = model.get_submodule(name)
        before = module_nbytes(old)
        if p.kind == "linear":
            new = _build_layer(p, old.weight, old.bias, dev, policy)
        else:
            new = _build_layer(p, old.weight, None, dev, policy, getattr(old, "padding_idx", None))
        new.train(False)
        _set_module(model, name, new)
        report.layers.append(_layer_report(p, new, before))
        if p.kind == "embedding":
            if model.llm.lm_head.weight is not old.weight:
                raise ValueError("llm.lm_head is not tied to embed_tokens; cannot share the int8 payload")
            _set_module(model, HEAD_NAME, new.tied_linear(EMBED_NAME))
        del old, new
    model.requires_grad_(False)
    report.component_bytes = component_nbytes(model)
    return report


#: After quantizing a weight at least this big, give freed heap pages back to the OS. Without it,
#: glibc's dynamic mmap threshold keeps the quantizers' large fp32 transients in the heap and the
#: full-size streaming load peaked at 7.8 GB RssAnon for a 3.4 GB result.
TRIM_AFTER_BYTES = 16 << 20


class StreamingQuantizer:
    """A `placer` for the checkpoint stream: quantizes planned layers as their tensors arrive.

    Call it as `placer(model, name, tensor) -> bool` (True when it took the tensor). A Linear's
    weight and bias arrive as separate tensors (bias usually first: safetensors sorts names), so
    whichever comes first is kept (cast to the storage dtype; only biases and at most one weight
    are ever held) until its partner arrives, then the layer is built and placed. embed_tokens
    becomes an Int8Embedding and lm_head an Int8Linear sharing its payload; vte an
    Int8VisualEmbedding. Call `finish()` after the stream to check nothing is left pending.
    """

    def __init__(self, model: OvisU1, policy: QuantPolicy, device: torch.device | str) -> None:
        self.policy = policy
        self.device = torch.device(device)
        self.plan = plan_model(model, policy)
        self.padding_idx = getattr(model.get_submodule(EMBED_NAME), "padding_idx", None)
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.report = ModelQuantReport(policy.name)

    def __call__(self, model: OvisU1, name: str, tensor: torch.Tensor) -> bool:
        module_name, _, leaf = name.rpartition(".")
        p = self.plan.get(module_name)
        if p is None:
            return False
        value = tensor.to(dtype=self.policy.dtype_for(name))
        parts = self.pending.setdefault(module_name, {})
        parts[leaf] = value
        needed = {"weight", "bias"} if p.bias else {"weight"}
        if not needed <= parts.keys():
            if value.data_ptr() == tensor.data_ptr():
                parts[leaf] = value.clone()  # do not pin the mmapped shard's page
            return True
        del self.pending[module_name]
        with torch.no_grad():
            new = _build_layer(p, parts["weight"], parts.get("bias"), self.device, self.policy, self.padding_idx)
        new.train(False)
        _set_module(model, module_name, new)
        if p.kind == "embedding":
            _set_module(model, HEAD_NAME, new.tied_linear(EMBED_NAME))
        bf16_bytes = sum(t.numel() for t in parts.values()) * 2
        self.report.layers.append(_layer_report(p, new, bf16_bytes))
        del parts, value
        if bf16_bytes >= TRIM_AFTER_BYTES:
            trim_host_heap(collect=False)
        return True

    def finish(self, model: OvisU1) -> None:
        """After the stream: nothing may be left waiting for its partner; tie the head unless it is int8."""
        if EMBED_NAME not in self.plan:
            tie_weights(model)
        if self.pending:
            names = sorted(f"{m}.{k}" for m, parts in self.pending.items() for k in parts)
            raise CheckpointError(f"{len(names)} tensor(s) arrived without their partner weight/bias: "
                                  f"{', '.join(names[:5])}")
