"""Loading the weights a run needs: in the preset's precision (or one dtype), on the host when they will page.
(On a CPU, the kernels they then run on are the CPU plan's: `lite/runtime/cpu/`.)"""

from __future__ import annotations

import warnings

import torch

from lite.errors import Notice
from lite.model.checkpoint import CheckpointKind, LoadReport, load_model
from lite.model.load_quantized import load_quantized_model
from lite.model.modeling_ovis_u1 import OvisU1
from lite.runtime.resolve import ResolvedRun


def load_weights(run: ResolvedRun) -> tuple[OvisU1, LoadReport, int | None]:
    """(model, report, paging budget or None), from what `run` resolved (nothing is looked up again).

    Without a preset: every weight in the run's dtype (bf16 by default), the VAE in its `vae_dtype` (a
    pre-quantized checkpoint keeps its own formats). With one: its precision applied while the tensors stream
    in and, on CUDA/MPS with a paging preset, the weights kept on the host to page inside the budget.
    """
    preset, device = run.preset, run.device
    if preset is None:
        if run.kind is CheckpointKind.PREQUANTIZED:
            model, report = load_quantized_model(run.directory, device=device, progress=run.progress, kind=run.kind,
                                                 config=run.config)
            return model, report, None
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
                                         progress=run.progress, kind=run.kind, config=run.config)
    return model, report, budget if paging else None
