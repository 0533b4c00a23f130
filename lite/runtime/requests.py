"""One `generate`/`edit` call, checked and settled before any work: `ImageRequest`.

The builders check every argument (one clear line per mistake), fill the sampler from the defaults (the
preset's or the reference's), and lay out the guidance branches; the pipeline then runs the request as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image

from lite.errors import InputError
from lite.model.images import as_image
from lite.model.processing import T2I_PREFIX, edit_output_size, stretch, t2i_size, unconditional, white_canvas
from lite.runtime.denoise import StepCallback, resolve_sampling
from lite.sampling import Guidance
from lite.validation import MAX_SIDE, MIN_SIDE, check_cfg, check_positive_int, check_seed, check_text

#: the most images one call makes
MAX_IMAGES = 64
Interval = tuple[float, float] | None | Literal["preset"]


@dataclass(frozen=True)
class ImageRequest:
    """Everything one `generate`/`edit` call runs with, already checked."""

    task: Literal["t2i", "edit"]
    prompt: str
    negative_prompt: str
    branches: list[tuple[str, str, Image.Image]]  # (guidance branch, LLM text, image) per condition
    size: tuple[int, int]  # the output size (floored for t2i)
    planned_size: tuple[int, int]  # the size the memory plan is made for (the requested one)
    guidance: Guidance
    steps: int
    solver: str
    spacing: str
    seed: int
    count: int  # images, seeds seed..seed+count-1
    batch: bool  # `num_images` was given: the call returns a list
    source: Image.Image | None = None  # edit: the input at the output size
    latent: str = "mean"  # edit: how the input is encoded
    img_cfg: float | None = None
    callback: StepCallback | None = None

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.count)]

    def settings(self, preset: str | None) -> dict[str, Any]:
        """What the result and the image metadata record, so `--config-from-metadata` can rerun it."""
        out: dict[str, Any] = dict(prompt=self.prompt, negative_prompt=self.negative_prompt, steps=self.steps,
                                   txt_cfg=self.guidance.txt_cfg)
        if self.task == "edit":
            out["img_cfg"] = self.img_cfg
        out.update(solver=self.solver, spacing=self.spacing)
        if self.task == "edit":
            out["latent"] = self.latent
        out.update(cfg_interval=list(self.guidance.interval) if self.guidance.interval else None, seed=self.seed)
        if self.batch:
            out["seeds"] = self.seeds
        if preset is not None:
            out["preset"] = preset
        return out


def _count(seed: int, num_images: int | None) -> int:
    count = 1 if num_images is None else num_images
    check_positive_int("num_images", count, 1, MAX_IMAGES)
    check_seed(seed, allow_none=False)
    check_positive_int("seed", seed, 0, 2**63 - count)
    return count


def t2i_request(defaults: dict[str, Any], prompt: str, width: int, height: int, steps: int | None, seed: int,
                txt_cfg: float, solver: str | None, spacing: str | None, cfg_interval: Interval,
                negative_prompt: str, num_images: int | None, callback: StepCallback | None) -> ImageRequest:
    """Text-to-image: 2-pass CFG (cond, no_both) on the reference's white canvas of the requested size."""
    check_text("prompt", prompt)
    for name, side in (("width", width), ("height", height)):
        check_positive_int(name, side, MIN_SIDE, MAX_SIDE)
    check_cfg("txt_cfg", txt_cfg)
    steps, solver, spacing, interval = resolve_sampling(defaults, steps, solver, spacing, cfg_interval)
    count = _count(seed, num_images)
    canvas = white_canvas(width, height)  # the reference's canvas: the requested size, not the floored one
    branches = [("cond", T2I_PREFIX + prompt, canvas), ("no_both", unconditional(negative_prompt), canvas)]
    return ImageRequest("t2i", prompt, negative_prompt, branches, t2i_size(width, height), (width, height),
                        Guidance(txt_cfg, 0.0, interval), steps, solver, spacing, seed, count, num_images is not None,
                        callback=callback)


def edit_request(defaults: dict[str, Any], image: Image.Image, instruction: str, steps: int | None, seed: int,
                 img_cfg: float, txt_cfg: float, solver: str | None, spacing: str | None, cfg_interval: Interval,
                 latent: str, negative_prompt: str, num_images: int | None,
                 callback: StepCallback | None) -> ImageRequest:
    """Editing: 3-pass CFG (cond, no_both on a white canvas, no_txt with the source) at smart_resize(32)."""
    check_text("instruction", instruction)
    check_cfg("img_cfg", img_cfg)
    check_cfg("txt_cfg", txt_cfg)
    steps, solver, spacing, interval = resolve_sampling(defaults, steps, solver, spacing, cfg_interval)
    if latent not in ("mean", "sample"):
        raise InputError(f"latent must be 'mean' or 'sample', got {latent!r}")
    image = as_image(image, "image")
    count = _count(seed, num_images)
    width, height = edit_output_size(*image.size)
    source = stretch(image, width, height)
    negative = unconditional(negative_prompt)
    branches = [("cond", instruction.strip(), source), ("no_both", negative, white_canvas(width, height)),
                ("no_txt", negative, source)]
    return ImageRequest("edit", instruction, negative_prompt, branches, (width, height), image.size,
                        Guidance(txt_cfg, img_cfg, interval), steps, solver, spacing, seed, count,
                        num_images is not None, source=source, latent=latent, img_cfg=img_cfg, callback=callback)
