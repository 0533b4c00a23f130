"""Build one quantized linear from one weight tensor: the unit a streaming loader calls.

Backend "auto" walks the registry's auto chain (e.g. nf4: bnb -> quanto int4 -> torch int8) and
takes the first backend that is installed, accepts the device and succeeds; an explicit backend
never falls back to another backend and raises `QuantBackendError` instead. Either way a weight
shape the chosen backend refuses (`Backend.accepts`) takes the next smaller format (int4 -> int8).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .backends import REGISTRY, candidates
from .errors import QuantBackendError
from .formats import COMPUTE_DTYPES, QUANT_FORMATS
from .spec import QuantSpec


def quantize_linear_from_weight(weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec,
                                device: torch.device | str | None = None,
                                compute_dtype: torch.dtype | None = None) -> nn.Module:
    """One quantized layer from one [out, in] weight (+bias), e.g. fresh from a mmapped safetensors.

    Only this weight is ever held in full precision (and only for the duration of the call).
    `device` defaults to the weight's device; `compute_dtype` defaults to `spec.compute_dtype`.
    Format "none" returns a plain Linear holding the weight as given.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    target = torch.device(device) if device is not None else weight.device
    if weight.device.type == "meta" and spec.format != "none":
        raise ValueError("weight is on the meta device: there is nothing to quantize; use restore_quantized "
                         "for pre-quantized checkpoints")
    cd = compute_dtype or spec.compute_dtype
    reasons: list[str] = []
    for step, why in candidates(replace(spec, compute_dtype=cd) if cd in COMPUTE_DTYPES else spec, target, tuple(weight.shape)):
        if why is None and target.type == "meta" and step.format in QUANT_FORMATS:
            why = "cannot quantize on the meta device"
        if why is None:
            try:
                return REGISTRY[step.backend].build(weight, bias, step.format, target, spec, cd)
            except (RuntimeError, NotImplementedError, TypeError) as exc:
                if spec.backend != "auto":
                    raise
                why = f"{type(exc).__name__}: {exc}"
        reasons.append(f"{step.backend}/{step.format}: {why}")
    raise QuantBackendError(f"no backend could build format {spec.format!r} on {target}: " + "; ".join(reasons))
