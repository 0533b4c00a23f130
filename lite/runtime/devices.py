"""Choosing where to run and in which precision, and saying so plainly."""

from __future__ import annotations

import torch

from lite.errors import DeviceError

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
DEVICES = ("auto", "cpu", "cuda", "mps")


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(name: str | torch.device | None = "auto") -> tuple[torch.device, str | None]:
    """The execution device, plus a one-line notice when a requested accelerator is missing."""
    name = str(name or "auto")
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise DeviceError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), None
        if mps_available():
            return torch.device("mps"), None
        return torch.device("cpu"), None
    if kind == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu"), "CUDA is not available here: falling back to CPU"
    if kind == "mps" and not mps_available():
        return torch.device("cpu"), "MPS is not available here: falling back to CPU"
    return torch.device(name), None


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 by default, as the reference runs; any of bf16/fp16/fp32 on request."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}; choose one of bf16, fp16, fp32")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
