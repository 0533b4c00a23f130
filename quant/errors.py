"""Exceptions raised by `quant`, kept apart so callers can catch them without importing backends."""

from __future__ import annotations

from offload.errors import UserError


class QuantError(UserError):
    """Base of the quantization errors a user can act on."""


class QuantFormatError(QuantError, ValueError):
    """A quantized payload or manifest cannot be used here (corrupt, mismatched or unportable)."""


class QuantBackendError(QuantError, RuntimeError):
    """An explicitly requested backend is missing or refuses the target device."""
