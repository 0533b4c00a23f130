"""A device-independent ledger of activation memory: live tensor bytes created inside a block of code.

On CUDA `torch.cuda.max_memory_allocated` answers this; on CPU and MPS nothing does, so tests and
benchmarks that compare memory strategies (tiled vs untiled decode, say) use this instead. It
counts every tensor an operator returns, once per storage, until the tensor is freed.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class ActivationLedger(TorchDispatchMode):
    """Context manager: `with ActivationLedger() as led: ...; led.peak_bytes`."""

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self._live:
                continue
            self._live[key] = storage.nbytes()
            self.live_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(t, self._free, key)
        return out
