"""The root of every error a user can fix, in the lowest layer so that `quant` and `lite` subclass it.

`offload` depends on nothing but torch, `quant` on `offload`, `lite` on both: a base class here is
importable by all three without any layer importing upwards. The CLI catches `UserError` by type
and prints its one-line message with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix (an input, a file, the machine): its message is one line saying how."""
