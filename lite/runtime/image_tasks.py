"""Text-to-image and editing: the conditions, the denoise loop and the decode of `OvisPipeline`.

    conditions  (ViT + visual head + VTE + LLM)  ->  denoise (Yak)  ->  decode (VAE)

A call is checked and settled into an `ImageRequest` (`lite.runtime.requests`) before any work and returns an
`ImageResult` (`lite.runtime.results`). Unlike the reference, the token refiner runs once per condition (not
at every step), and the RoPE table is built once per condition.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from lite.model import latents
from lite.model.memory_profile import Workload
from lite.model.modeling_ovis_u1 import OvisU1
from lite.model.modeling_yak import RefinedText
from lite.model.processing import generation_prompt
from lite.runtime.caches import RuntimeCaches
from lite.runtime.condition_cache import refined_condition
from lite.runtime.denoise import PRESET, Condition, Denoised, StepCallback, flow_timesteps, guided_denoise
from lite.runtime.offload_session import OffloadSession
from lite.runtime.presets import Preset
from lite.runtime.requests import ImageRequest, Interval, edit_request, t2i_request
from lite.runtime.results import ImageResult, RunStats
from lite.runtime.vae import decode_latent, encode_image
from lite.sampling import Guidance, guided_nfe


class ImageTasks:
    """`generate` and `edit` (and their phases), mixed into `OvisPipeline`, which provides what is declared."""

    model: OvisU1
    device: torch.device
    dtype: torch.dtype
    vae: Any
    preset: Preset | None
    model_id: str
    offload: OffloadSession
    caches: RuntimeCaches
    _phase: Callable[[str], None]
    _bar: Callable[[int, str], Any]
    _llm_inputs: Callable[[str, list[Image.Image], bool], torch.Tensor]
    _finish: Callable[[RunStats, float], RunStats]
    _start_peaks: Callable[[], None]
    sampling_defaults: Callable[[], dict[str, Any]]
    workload: Callable[..., Workload]

    # -- conditions -----------------------------------------------------------------------------------

    @torch.no_grad()
    def condition(self, content: str, image: Image.Image) -> Condition:
        """ViT + LLM condition for one (content, image) pair, refined once for all steps."""
        txt = self.model.condition(self._llm_inputs(generation_prompt(content), [image], True))
        return Condition(self.refine(txt))

    def refine(self, txt: torch.Tensor) -> RefinedText:
        return self.model.visual_generator.backbone.refine(txt.to(self.device))

    def _conditions(self, stats: RunStats, branches: list[tuple[str, str, Image.Image]]) -> dict[str, Condition]:
        self._phase("conditions")
        t0 = time.perf_counter()
        out: dict[str, Condition] = {}
        with self._bar(len(branches), "conditions") as bar:
            for name, content, img in branches:  # cached by (content, image): a repeat skips ViT, LLM and refiner
                out[name] = Condition(refined_condition(self.caches.conditions, content, img, self.condition))
                bar.update(1)
        stats.add_phase("conditions", time.perf_counter() - t0)
        return out

    # -- generate, edit, denoise, decode --------------------------------------------------------------

    def timesteps(self, steps: int, n_tokens: int, spacing: str = "linear") -> list[float]:
        return flow_timesteps(self.model.config.yak, steps, n_tokens, spacing)

    def generate(self, prompt: str, width: int = 1024, height: int = 1024, steps: int | None = None, seed: int = 42,
                 txt_cfg: float = 5.0, solver: str | None = None, spacing: str | None = None,
                 cfg_interval: Interval = PRESET, negative_prompt: str = "", num_images: int | None = None,
                 callback: StepCallback | None = None) -> ImageResult:
        """Text-to-image with 2-pass CFG (cond, no_both); the latent is W x H floored to multiples of 16.

        `negative_prompt` replaces the text of the unconditional (no_both) branch, the reference's
        "Generate an image." by default. `num_images=N` makes N images with seeds seed..seed+N-1.
        A `callback` returning False stops quietly: the result is marked `cancelled` (see `ImageResult`).
        """
        return self.run_images(t2i_request(self.sampling_defaults(), prompt, width, height, steps, seed, txt_cfg,
                                           solver, spacing, cfg_interval, negative_prompt, num_images, callback))

    def edit(self, image: Image.Image, instruction: str, steps: int | None = None, seed: int = 42,
             img_cfg: float = 1.5, txt_cfg: float = 6.0, solver: str | None = None, spacing: str | None = None,
             cfg_interval: Interval = PRESET, latent: str = "mean", negative_prompt: str = "",
             num_images: int | None = None, callback: StepCallback | None = None) -> ImageResult:
        """Instruction editing with 3-pass CFG; output size is smart_resize(factor 32) of the input.

        `negative_prompt` replaces the text of the two unconditional-text branches (no_txt, with the
        source image, and no_both, with the white canvas). The input is VAE-encoded deterministically:
        `latent="mean"` uses the posterior mean (the reference samples it); `latent="sample"` draws a
        sample seeded by `seed`.
        """
        return self.run_images(edit_request(self.sampling_defaults(), image, instruction, steps, seed, img_cfg,
                                            txt_cfg, solver, spacing, cfg_interval, latent, negative_prompt,
                                            num_images, callback))

    def run_images(self, req: ImageRequest) -> ImageResult:
        """Conditions once, then per image: noise from its seed, denoise, decode (stopping where told to)."""
        width, height = req.size
        self.vae  # built (diffusers imported) here on the first image task, before its clock and memory peaks start
        start = time.perf_counter()
        self._start_peaks()
        stats = RunStats(task=req.task, steps=req.steps, width=width, height=height)
        nfe = self.planned_nfe(req.task, req.steps, req.solver, req.spacing, req.guidance.interval, width * height)
        stopped = False

        def run() -> list[Image.Image]:
            nonlocal stopped
            stats.nfe = stats.nfe_total = stats.images = 0  # an out-of-memory retry starts over
            stats.phases.clear()
            stopped = False
            conditions = self._conditions(stats, req.branches)
            if req.source is not None:
                cond_latent = self.encode_image(req.source, req.latent, req.seed)
                cond_ids = latents.image_ids(height // 16, width // 16, index=1, device=self.device)
                for name in ("cond", "no_txt"):
                    conditions[name].cond_latent, conditions[name].cond_ids = cond_latent, cond_ids
            out = []
            for seed in req.seeds:
                noise = latents.latent_noise(height, width, seed, self.device, self.dtype)
                image, stopped = self._denoise_and_decode(stats, noise, conditions, req)
                out.append(image)
                if stopped:
                    break
            return out

        images = self.offload.run(self.workload(req.task, *req.planned_size, nfe=nfe), run)
        stats.settings = req.settings(self.preset.name if self.preset is not None else None)
        self._finish(stats, start)
        result = ImageResult(images, req.seeds[:len(images)], stats, self.model_id,
                             self.preset.name if self.preset is not None else None, cancelled=stopped)
        for i, image in enumerate(images):
            image.info.update(nfe=stats.nfe, seed=result.seeds[i])
        return result

    def encode_image(self, image: Image.Image, mode: str = "mean", seed: int = 42) -> torch.Tensor:
        """Packed, scaled VAE latent of an image already at the output size."""
        self._phase("decode")
        return encode_image(self.vae, image, self.model.config.vae_scaling_factor, mode, seed, self.device,
                            self.dtype)

    def _denoise_and_decode(self, stats: RunStats, noise: torch.Tensor, conditions: dict[str, Condition],
                            req: ImageRequest) -> tuple[Image.Image, bool]:
        _, _, h, w = noise.shape
        rows, cols = h // 2, w // 2
        timesteps = self.timesteps(req.steps, rows * cols, req.spacing)
        t0 = time.perf_counter()
        done = self._denoise(latents.pack(noise), rows, cols, conditions, req.guidance, timesteps, req.solver,
                             req.callback)
        stats.add_phase("denoise", time.perf_counter() - t0)
        stats.images += 1
        stats.nfe_total += done.nfe
        stats.nfe = max(stats.nfe, done.nfe)  # every full image takes the same evaluations
        t0 = time.perf_counter()
        image = self.decode(done.latent, rows, cols)
        stats.add_phase("decode", time.perf_counter() - t0)
        return image, done.stopped

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, rows: int, cols: int, conditions: dict[str, Condition], guidance: Guidance,
                timesteps: list[float], solver: str = "euler", stats: RunStats | None = None,
                callback: StepCallback | None = None) -> torch.Tensor:
        """Integrate from packed noise to a packed latent with 2-pass (t2i) or 3-pass (edit) CFG."""
        done = self._denoise(x, rows, cols, conditions, guidance, timesteps, solver, callback)
        if stats is not None:
            stats.nfe, stats.nfe_total = done.nfe, stats.nfe_total + done.nfe
        return done.latent

    @torch.no_grad()
    def _denoise(self, x: torch.Tensor, rows: int, cols: int, conditions: dict[str, Condition], guidance: Guidance,
                 timesteps: list[float], solver: str, callback: StepCallback | None) -> Denoised:
        self._phase("denoise")
        with self._bar(len(timesteps) - 1, "denoise steps") as bar:
            return guided_denoise(self.model.visual_generator.backbone, x, rows, cols, conditions, guidance,
                                  timesteps, solver, lambda: bar.update(1), callback)

    def decode(self, packed: torch.Tensor, rows: int, cols: int) -> Image.Image:
        """Unpack, divide by the scaling factor (no shift), VAE-decode, clamp and truncate to uint8."""
        self._phase("decode")
        with self._bar(1, "decode") as bar:
            image = decode_latent(self.vae, packed, rows, cols, self.model.config.vae_scaling_factor)
            bar.update(1)
        return image

    def preview(self, latent: torch.Tensor) -> Image.Image:
        """A cheap RGB preview (1/8 of the output side, no VAE) of a latent a step callback received."""
        return Image.fromarray(latents.preview_rgb(latent).numpy())


    def planned_nfe(self, task: str, steps: int, solver: str = "euler", spacing: str = "linear",
                    cfg_interval: tuple[float, float] | None = None, pixels: int = 1024 * 1024) -> int:
        """MMDiT evaluations per image (`lite.runtime.results` defines the counts): the conditional pass at
        every evaluation, the others only where guidance is active (at the times the solver visits)."""
        passes = self.model.architecture.cfg_passes[task]
        return guided_nfe(passes, solver, spacing, steps, cfg_interval, max(pixels // 256, 1))
