"""Errors the user can fix. Each message is one line that says what is wrong and how to fix it.

Kept free of heavy imports so the CLI can report a bad argument before torch is loaded.
"""

from __future__ import annotations

from offload.errors import UserError


class OvisLiteError(UserError):
    """Base of ovis-lite's own user-fixable errors (the CLI reports every `UserError` as one line, exit 2)."""


class InputError(OvisLiteError, ValueError):
    """Bad user input: an image, a prompt, a number out of range."""


class ConfigError(OvisLiteError, ValueError):
    """A config file that cannot describe an Ovis-U1 model."""


class CheckpointError(OvisLiteError):
    """A checkpoint that cannot be found or loaded."""


class TokenizerError(OvisLiteError):
    """A checkpoint whose tokenizer files are missing or unusable."""


class DeviceError(OvisLiteError, ValueError):
    """An unknown device or dtype name."""


class OutputError(OvisLiteError):
    """An output that cannot be written without losing something the user owns."""


class Cancelled(OvisLiteError):
    """A run stopped by its step callback (it returned False) or by the user."""


class ArgumentTypeError(InputError, TypeError):
    """An argument of the wrong type (`seed="x"`, `prompt=123`, `image=None`): names the argument and the type."""


class Notice(UserWarning):
    """Something the user should know that does not stop the run (the CLI prints it as one line)."""
