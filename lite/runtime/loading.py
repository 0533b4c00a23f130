"""Loading the weights a run needs: in the preset's precision (or one dtype), on the host when they will page,
and on a CPU the compute dtype the instruction set makes fast."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lite.errors import Notice
from lite.model.checkpoint import LoadReport, load_model, load_quantized_model
from lite.model.modeling_ovis_u1 import OvisU1
from lite.runtime.resolve import ResolvedRun


def load_weights(run: ResolvedRun) -> tuple[OvisU1, LoadReport, int | None]:
    """(model, report, paging budget or None).

    Without a preset: every weight in the run's dtype (bf16 by default), the VAE in its `vae_dtype` (a
    pre-quantized checkpoint keeps its own formats). With one: its precision applied while the tensors stream
    in and, on CUDA/MPS with a paging preset, the weights kept on the host to page inside the budget.
    """
    preset, device = run.preset, run.device
    if preset is None:
        if run.quantized:
            return (*load_quantized_model(run.directory, device=device, progress=run.progress, config=run.config),
                    None)
        compute = run.dtype or torch.bfloat16
        vae_prefix = OvisU1.architecture.prefix("vae")

        def dtype_for(name: str) -> torch.dtype:
            return run.vae_dtype if name.startswith(vae_prefix) else compute

        model, report = load_model(run.directory, device=device, dtype=dtype_for, progress=run.progress,
                                   config=run.config)
        return model, report, None
    if device.type not in preset.devices:
        warnings.warn(f"preset {preset.name} is meant for {'/'.join(preset.devices)}, not {device.type}: its "
                      f"budget and kernels were not chosen for this device", Notice, stacklevel=3)
    budget = run.budget_bytes if run.budget_bytes is not None else preset.budget_bytes
    paging = preset.offload and budget is not None and device.type in ("cuda", "mps")
    model, report = load_quantized_model(run.directory, preset.precision.policy(device.type),
                                         device=torch.device("cpu") if paging else device, dtype=run.dtype,
                                         progress=run.progress, config=run.config)
    return model, report, budget if paging else None


def choose_cpu_compute(model: OvisU1) -> tuple[torch.dtype | None, str, Any]:
    """(compute dtype if it differs from the stored weights, the reason in words, the removable handle).

    bf16 where the CPU's bf16 GEMMs are native; else fp32 compute over the stored bf16 or quantized
    weights (`quant.compute`), so the memory stays what was planned.
    """
    from lite.runtime.hardware import cpu_compute_dtype

    compute, reason = cpu_compute_dtype()
    if compute == torch.float32 and model.visual_generator.backbone.img_in.weight.dtype != torch.float32:
        from quant.compute import use_fp32_compute

        return torch.float32, reason, use_fp32_compute(model)
    return None, reason, None


#: Components whose token-wise bf16 Linears run packed on CPU (quant.prepack); the LLM is left alone: its dense
#: layers run on one row at every decode step, where packing changes the kernel and gains nothing.
PACKED_COMPONENTS = ("vision", "yak")


def runs_on_one_row(component: str, name: str) -> bool:
    """Whether a Linear (path relative to its component) runs on one row: the Yak's adaLN modulation, its
    time/vector/text embedders and final layer (the Linears the quantizing presets keep in bf16)."""
    from fnmatch import fnmatchcase

    from lite.model.architecture import OVIS_U1

    return component == "yak" and any(fnmatchcase(name, p) for p in OVIS_U1.yak_modulation + OVIS_U1.yak_keep_bf16)


def pack_cpu_linears(model: OvisU1) -> Any:
    """Reorder the Yak's and the ViT's token-wise bf16 weights once into oneDNN's layout (see `quant.prepack`).

    Returns the removable handle (empty where oneDNN's bf16 GEMM is not native)."""
    from quant.prepack import PackedLinears, use_packed_linears

    state = PackedLinears()
    for component, root in model.architecture.component_modules(model).items():
        if component in PACKED_COMPONENTS:
            state.layers += use_packed_linears(root, lambda name, c=component: runs_on_one_row(c, name)).layers
    return state
