"""Residency ledger: what the offloader has placed on the execution device, byte by byte.

On a GPU this is the offloader's own view (allocator caches and activations are not in it); on a
CPU, where nothing moves, it is the only measure of what *would* be resident, which is what the
tests check against the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ResidencyLedger:
    """Per-unit resident bytes with current and peak totals, overall and per phase."""

    _resident: dict[str, int] = field(default_factory=dict)
    current_bytes: int = 0
    peak_bytes: int = 0
    phase: str | None = None
    phase_peaks: dict[str, int] = field(default_factory=dict)
    onloads: int = 0
    onloaded_bytes: int = 0

    def add(self, unit: str, nbytes: int) -> None:
        if unit in self._resident:
            raise ValueError(f"unit {unit} is already resident in the ledger")
        self._resident[unit] = nbytes
        self.current_bytes += nbytes
        self.onloads += 1
        self.onloaded_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        key = self.phase if self.phase is not None else "<none>"
        self.phase_peaks[key] = max(self.phase_peaks.get(key, 0), self.current_bytes)

    def remove(self, unit: str) -> int:
        nbytes = self._resident.pop(unit)
        self.current_bytes -= nbytes
        return nbytes

    def set_phase(self, phase: str | None) -> None:
        self.phase = phase
        key = phase if phase is not None else "<none>"
        self.phase_peaks[key] = max(self.phase_peaks.get(key, 0), self.current_bytes)

    def is_resident(self, unit: str) -> bool:
        return unit in self._resident

    def resident(self) -> dict[str, int]:
        return dict(self._resident)

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes
        self.phase_peaks = {}

    def snapshot(self) -> dict[str, object]:
        return {
            "current_bytes": self.current_bytes,
            "peak_bytes": self.peak_bytes,
            "phase": self.phase,
            "phase_peaks": dict(self.phase_peaks),
            "resident": dict(self._resident),
            "onloads": self.onloads,
            "onloaded_bytes": self.onloaded_bytes,
        }
