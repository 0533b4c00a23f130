"""Exceptions raised by `quant`, kept apart so callers can catch them without importing backends."""

from __future__ import annotations


class QuantFormatError(ValueError):
    """A quantized payload or manifest cannot be used here (corrupt, mismatched or unportable)."""


class QuantBackendError(RuntimeError):
    """An explicitly requested backend is missing or refuses the target device."""
