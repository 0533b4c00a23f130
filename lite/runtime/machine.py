"""What this machine offers: the device kind, its free memory, host RAM (or what `--vram`/`--ram` pretend)."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

GiB = 1 << 30


@dataclass(frozen=True)
class Machine:
    device_type: str  # cuda, mps or cpu
    device_total: int | None  # accelerator memory (MPS: the recommended working set)
    device_free: int | None
    ram_bytes: int
    detected: bool = True  # False when --vram/--ram describe another machine

    def describe(self) -> str:
        ram = f"{self.ram_bytes / GiB:.1f} GiB RAM"
        if self.device_type == "cpu":
            return f"CPU only, {ram}"
        kind = "CUDA" if self.device_type == "cuda" else "MPS"
        free = self.device_free or 0
        if not self.detected and self.device_total == self.device_free:
            return f"a {kind} device assumed to have {free / GiB:.1f} GiB free (--vram), {ram}"
        return f"{kind} with {free / GiB:.1f} of {(self.device_total or 0) / GiB:.1f} GiB free, {ram}"


def detect_machine(device: torch.device, vram: int | None = None, ram: int | None = None) -> Machine:
    """CUDA: torch.cuda.mem_get_info; MPS: its recommended maximum; host RAM: psutil.

    `vram`/`ram` pretend to be another machine (`--vram 6GB` on a CPU-only box plans for a 6 GB GPU).
    """
    host = ram if ram is not None else int(psutil.virtual_memory().available)
    if vram is not None:
        kind = device.type if device.type in ("cuda", "mps") else "cuda"
        return Machine(kind, vram, vram, host, detected=False)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return Machine("cuda", int(total), int(free), host, detected=ram is None)
    if device.type == "mps":
        usable = int(torch.mps.recommended_max_memory())
        return Machine("mps", usable, usable, host, detected=ram is None)
    return Machine("cpu", None, None, host, detected=ram is None)
