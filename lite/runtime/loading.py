"""Loading the weights a run needs: in the preset's precision (or one dtype), on the host when they will page.
(On a CPU, the kernels they then run on are the CPU plan's: `lite/runtime/cpu/`.)"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from lite.errors import Notice
from lite.model.checkpoint import CheckpointKind, LoadReport, checkpoint_kind, load_model
from lite.model.load_quantized import load_quantized_model
from lite.model.modeling_ovis_u1 import OvisU1
from lite.runtime.devices import resolve_dtype
from lite.runtime.presets import Preset


def load_weights(directory: Path, device: torch.device, dtype: str | torch.dtype | None, vae_dtype: torch.dtype,
                 preset: Preset | None, budget_bytes: int | None,
                 progress: bool) -> tuple[OvisU1, LoadReport, int | None]:
    """(model, report, paging budget or None).

    Without a preset: every weight in `dtype` (bf16 by default), the VAE in `vae_dtype` (a pre-quantized
    checkpoint keeps its own formats). With one: its precision applied while the tensors stream in and,
    on CUDA/MPS with a paging preset, the weights kept on the host to page inside the budget.
    """
    kind = checkpoint_kind(directory)
    if preset is None:
        if kind is CheckpointKind.PREQUANTIZED:
            model, report = load_quantized_model(directory, device=device, progress=progress, kind=kind)
            return model, report, None
        compute = resolve_dtype(dtype)
        vae_prefix = OvisU1.architecture.prefix("vae")

        def dtype_for(name: str) -> torch.dtype:
            return vae_dtype if name.startswith(vae_prefix) else compute

        model, report = load_model(directory, device=device, dtype=dtype_for, progress=progress)
        return model, report, None
    if device.type not in preset.devices:
        warnings.warn(f"preset {preset.name} is meant for {'/'.join(preset.devices)}, not {device.type}: its "
                      f"budget and kernels were not chosen for this device", Notice, stacklevel=3)
    budget = budget_bytes if budget_bytes is not None else preset.budget_bytes
    paging = preset.offload and budget is not None and device.type in ("cuda", "mps")
    override = None if dtype in (None, "auto") else resolve_dtype(dtype)
    model, report = load_quantized_model(directory, preset.precision.policy(device.type),
                                         device=torch.device("cpu") if paging else device, dtype=override,
                                         progress=progress, kind=kind)
    return model, report, budget if paging else None
