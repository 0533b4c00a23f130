"""Choosing where to run and in which precision, and saying so plainly."""

from __future__ import annotations

import re

import torch

from lite.errors import DeviceError

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
DEVICES = ("auto", "cpu", "cuda", "mps")
_DEVICE = re.compile(r"(auto|cpu|cuda|mps)(:\d+)?")


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(name: str | torch.device | None = "auto", strict: bool = False) -> tuple[torch.device, str | None]:
    """The execution device, plus a one-line notice when a requested accelerator is missing.

    `strict` (the Python API) refuses a missing accelerator instead of falling back to the CPU.
    """
    name = str(name or "auto")
    if not _DEVICE.fullmatch(name) or (name.startswith(("auto", "cpu")) and ":" in name):
        raise DeviceError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)} (or cuda:N)")
    kind = name.split(":")[0]
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), None
        if mps_available():
            return torch.device("mps"), None
        return torch.device("cpu"), None
    missing = (kind == "cuda" and not torch.cuda.is_available()) or (kind == "mps" and not mps_available())
    if missing:
        label = "CUDA" if kind == "cuda" else "MPS"
        if strict:
            raise DeviceError(f"{label} is not available here; pass device='cpu' or device='auto'")
        return torch.device("cpu"), f"{label} is not available here: falling back to CPU"
    if kind == "cuda" and ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise DeviceError(f"{name} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name), None


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """bf16 by default, as the reference runs; any of bf16/fp16/fp32 on request."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise DeviceError(f"unsupported dtype {name}; choose one of bf16, fp16, fp32")
        return name
    if name in (None, "auto"):
        return torch.bfloat16
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}; choose one of bf16, fp16, fp32")
    return DTYPES[name]


def dtype_label(dtype: torch.dtype) -> str:
    """bf16 / fp16 / fp32: how the CLI, reports and image metadata name a compute dtype."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
