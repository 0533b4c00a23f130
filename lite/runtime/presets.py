"""Named quality-vs-memory presets: one data table, each row carrying its precision, sampler and budget.

A preset bundles the precision per component (`lite.model.precision`), the device budget the offload
planner must fit (`offload/`), the sampler (`lite.sampling`), VAE tiling, and where it runs. What a
preset *costs* is computed by `lite.runtime.planning`; which one a machine gets is decided there too,
by walking this table in order: nothing branches on a preset's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from lite.errors import InputError
from lite.model.architecture import OVIS_U1
from lite.model.precision import BALANCED, CPU, LOW, MINIMAL, MPS, QUALITY, REFERENCE, TINY, Precision
from lite.sampling import guided_nfe

GiB = 1 << 30


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    precision: Precision
    audience: str  # who it is for, in a few words (the README's preset table)
    budget_bytes: int | None  # device budget for the offload plan; None: everything stays resident
    solver: str = "euler"
    spacing: str = "linear"
    steps: int = 50
    cfg_interval: tuple[float, float] | None = None
    vae_tile: int | None = None  # tile side in px once an image side exceeds it
    devices: tuple[str, ...] = ("cuda", "mps", "cpu")  # where it may run
    auto_on: tuple[str, ...] = ()  # device types whose automatic choice considers it (in table order)
    offload: bool = True  # page through the device (False on unified memory and CPU)
    any_card: bool = False  # the automatic choice offers it to cards smaller than ~90% of its budget

    def nfe(self, task: str, tokens: int = 4096) -> int:
        """MMDiT evaluations per image at `tokens` target tokens (4096 = 1024x1024)."""
        return guided_nfe(OVIS_U1.cfg_passes[task], self.solver, self.spacing, self.steps, self.cfg_interval, tokens)

    @property
    def sampling(self) -> dict[str, object]:
        """The keyword arguments `OvisPipeline.generate/edit` take for this preset's sampler."""
        return {"steps": self.steps, "solver": self.solver, "spacing": self.spacing, "cfg_interval": self.cfg_interval}


# Few-step settings measured in docs/sampling.md (analytic and tiny-model benchmarks).
FAST = dict(solver="unipc", spacing="karras", steps=15, cfg_interval=(0.1, 1.0))
LEAN = dict(solver="unipc", spacing="karras", steps=12, cfg_interval=(0.1, 1.0))
CPU_FAST = dict(solver="unipc", spacing="linear", steps=8)

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("reference", "bf16 everywhere, 50 Euler steps, all on the device: the reference's exact semantics",
           REFERENCE, "16 GB+ GPUs", budget_bytes=None, offload=False, auto_on=("cuda",)),
    Preset("quality", "bf16 weights and reference sampling; components leave the device between phases (12 GB)",
           QUALITY, "12 GB GPUs", budget_bytes=12 * GiB, devices=("cuda",), auto_on=("cuda",)),
    Preset("balanced", "for 8 GB GPUs: 4-bit LLM, 8-bit ViT/head/VTE/Yak, 15-step UniPC, CFG for t >= 0.1",
           BALANCED, "8 GB GPUs", budget_bytes=8 * GiB, vae_tile=1024, devices=("cuda",), auto_on=("cuda",), **FAST),
    Preset("low", "for 6 GB GPUs: the balanced formats, 12 steps, a 6 GB plan, VAE tiles from 768 px",
           LOW, "6 GB GPUs", budget_bytes=6 * GiB, vae_tile=768, devices=("cuda",), auto_on=("cuda",), **LEAN),
    Preset("tiny", "for 4 GB GPUs: 4-bit Yak too; blocks page when needed, 512 px VAE tiles",
           TINY, "4 GB GPUs", budget_bytes=4 * GiB, vae_tile=512, devices=("cuda",), auto_on=("cuda",), **LEAN),
    Preset("minimal", "for 2 GB: 4-bit ViT too; everything pages block by block, 512 px VAE tiles",
           MINIMAL, "2 GB GPUs", budget_bytes=2 * GiB, vae_tile=512, devices=("cuda",), auto_on=("cuda",), any_card=True, **LEAN),
    Preset("mps", "Apple unified memory: small quanto weights, nothing pointlessly offloaded to the CPU",
           MPS, "Apple silicon", budget_bytes=None, offload=False, vae_tile=1024, devices=("mps",), auto_on=("mps",), **FAST),
    Preset("cpu", "plain CPU: native int4 LLM layers, bf16 storage elsewhere, computed in bf16 where the CPU has "
           "native bf16 and in fp32 where it does not; 8-step UniPC",
           CPU, "no GPU", budget_bytes=None, offload=False, devices=("cpu",), auto_on=("cpu",), **CPU_FAST),
)}


def get_preset(name: str | Preset) -> Preset:
    if isinstance(name, Preset):
        return name
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
