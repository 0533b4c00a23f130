"""One object for the three tasks: understand, generate (text-to-image) and edit.

Every task runs in phases with clean boundaries, so that an offloader can move components:

    conditions  (ViT + visual head + VTE + LLM)  ->  denoise (Yak)  ->  decode (VAE)

Unlike the reference, the token refiner runs once per condition (not at every step), the RoPE
table is built once per condition, and nothing needs flash-attn, CUDA or float64 on the device.
Paging lives in `OffloadSession`, planning in `lite.runtime.planning`: this file holds the tasks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from lite.errors import InputError
from lite.memory import HostPeakSampler, device_peak_bytes, peak_rss_bytes, reset_device_peak
from lite.model import latents
from lite.model.checkpoint import LoadReport, find_checkpoint, model_id_of
from lite.model.config import PreprocessorConfig
from lite.model.preflight import check_checkpoint_files
from lite.runtime.host_pages import PhasePageRelease
from lite.model.images import as_image, as_images
from lite.model.memory_profile import Workload
from lite.model.modeling_ovis_u1 import OvisU1
from lite.model.modeling_yak import RefinedText
from lite.model.processing import (T2I_PREFIX, Turn, edit_output_size,
                                   generation_prompt, generation_vision_input, preprocess_image, stretch, t2i_size,
                                   tokenize_with_images, truncate_left, unconditional, understanding_prompt,
                                   white_canvas)
from lite.model.tokenizer import load_tokenizer
from lite.progress import progress_bar
from lite.runtime.caches import RuntimeCaches
from lite.runtime.condition_cache import refined_condition
from lite.runtime.cpu.install import CpuHooks, install_cpu_plan
from lite.runtime.cpu.plan import CpuPlan
from lite.runtime.cpu.probes import this_machine_plan
from lite.runtime.decode import Sampling
from lite.runtime.denoise import PRESET, Condition, StepCallback, flow_timesteps, guided_denoise, resolve_sampling
from lite.runtime.vae import decode_latent, encode_image, set_vae_tiling
from lite.runtime.devices import dtype_label, resolve_device
from lite.runtime.hardware import detect
from lite.runtime.loading import load_weights
from lite.runtime.offload_session import OffloadSession
from lite.runtime.presets import Preset, get_preset
from lite.runtime.understanding import answer
from lite.runtime.vision import visual_embeddings
from lite.sampling import Guidance, guided_nfe
from lite.validation import (MAX_SIDE, MIN_SIDE, check_cfg, check_max_new_tokens, check_positive_int, check_probability,
                             check_seed, check_temperature, check_text)

PhaseListener = Callable[[str], None]
REFERENCE_SAMPLING: dict[str, Any] = {"steps": 50, "solver": "euler", "spacing": "linear", "cfg_interval": None}


@dataclass
class RunStats:
    """What one call cost: reported by the CLI and kept on the pipeline as `last_run`."""

    task: str
    seconds: float = 0.0
    nfe: int = 0
    steps: int = 0
    width: int = 0
    height: int = 0
    peak_device_bytes: int | None = None
    peak_rss_bytes: int = 0  # the process's high-water mark (VmHWM): the load's peak included
    peak_anon_bytes: int = 0  # during the run: anonymous (heap, converted weights, activations) ...
    peak_mapped_bytes: int = 0  # ... and file-backed (checkpoint pages a phase reads, libraries)
    tokens: int = 0  # understanding: generated tokens
    machine: dict[str, Any] = field(default_factory=dict)  # on a CPU: its instruction sets and cores
    phases: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # understanding: prefix tokens reused; every task: caches' stats


class OvisPipeline:
    """Ovis-U1 understanding, text-to-image and editing on cpu, cuda or mps."""

    def __init__(self, model: OvisU1, tokenizer: PreTrainedTokenizerBase, preprocessor: PreprocessorConfig,
                 device: torch.device, progress: bool = True, load_report: LoadReport | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.pp = preprocessor
        self.device = device
        self.progress = progress
        self.load_report = load_report
        self.phase_listeners: list[PhaseListener] = []
        self.last_run: RunStats | None = None
        self._host_peaks: HostPeakSampler | None = None  # the running call's host memory sampler
        self.model_id = "AIDC-AI/Ovis-U1-3B"
        self.vae_tile: int | None = None  # decode/encode tile side (px); None = untiled
        self.preset: Preset | None = None
        self.compute_dtype: torch.dtype | None = None  # set when compute differs from the stored weights
        self.compute_reason: str | None = None  # why this compute dtype, for the load report
        self.cpu_plan: CpuPlan | None = None  # on a CPU: the kernels this process runs, each with its reason
        self.cpu_hooks: CpuHooks | None = None  # what the plan hooked on this model (removable; `plan_dict()`)
        self.caches = RuntimeCaches()  # vision, prefix KV and conditions kept between calls (lite.runtime.caches)
        self.notify: Callable[[str], None] = lambda message: None
        self.offload = OffloadSession(model, preprocessor, device, lambda message: self.notify(message))

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device = "auto",
                        dtype: str | torch.dtype | None = "auto", vae_dtype: torch.dtype = torch.float32,
                        preset: str | Preset | None = None, budget_bytes: int | None = None,
                        progress: bool = True) -> "OvisPipeline":
        """Load a checkpoint directory (or the HF cache, or a pre-quantized checkpoint).

        Without a preset: every weight in `dtype` (bf16 by default), the VAE in fp32 like the reference,
        and the reference's sampler. With a preset (a name or a `Preset`): its precision is applied while
        the tensors stream in, its sampler becomes the default of `generate`/`edit`, its VAE tiling is set,
        and on CUDA/MPS the weights stay on the host and page through the device inside `budget_bytes`
        (default: the preset's budget). An accelerator asked for by name must exist.
        """
        directory = find_checkpoint(path)
        dev, _ = resolve_device(device, strict=True)
        preset = get_preset(preset) if preset is not None else None
        _, pp = check_checkpoint_files(directory)  # every file check, then the tokenizer, before any weight
        tokenizer = load_tokenizer(directory)
        model, report, budget = load_weights(directory, dev, dtype, vae_dtype, preset, budget_bytes, progress)
        pipe = cls(model, tokenizer, pp, dev, progress, report)
        pipe.model_id = model_id_of(directory)
        if preset is not None:
            pipe.preset = preset
            pipe.set_vae_tiling(preset.vae_tile)
        if budget is not None:
            pipe.enable_offload(budget)
        if dev.type == "cpu":  # the CPU plan's kernels, as hooks (paging takes off what it must by itself)
            if budget is None:  # each phase's unused checkpoint pages leave the RSS (lite.runtime.host_pages)
                pipe.phase_listeners.append(PhasePageRelease(model))
            pipe.cpu_plan, auto = this_machine_plan(), dtype in (None, "auto")
            pipe.cpu_hooks = install_cpu_plan(model, pipe.cpu_plan, auto_dtype=auto)
            pipe.compute_dtype, pipe.compute_reason = pipe.cpu_hooks.compute_dtype, pipe.cpu_plan.compute.reason if auto else None
        return pipe

    # -- state --------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (weights may be stored narrower: bf16 storage with fp32 compute on some CPUs)."""
        return self.compute_dtype or self.model.visual_generator.backbone.img_in.weight.dtype

    @property
    def vae(self) -> Any:
        return self.model.visual_generator.vae

    @property
    def offload_plan(self) -> Any:
        return self.offload.plan

    @property
    def offloader(self) -> Any:
        return self.offload.offloader

    def enable_offload(self, budget_bytes: int, prefetch_depth: int = 1, simulate: bool = False) -> None:
        """Page the weights through the device inside `budget_bytes` (see `OffloadSession.enable`)."""
        self.offload.enable(budget_bytes, prefetch_depth, simulate)

    def disable_offload(self) -> None:
        self.offload.disable()

    def sampling_defaults(self) -> dict[str, Any]:
        """The sampler `generate`/`edit` use when not told: the preset's, else the reference's."""
        return dict(self.preset.sampling) if self.preset is not None else dict(REFERENCE_SAMPLING)

    def set_vae_tiling(self, tile: int | None, overlap: float = 0.25) -> None:
        """Decode and encode in blended tiles of `tile` px once an image side exceeds it (`lite.runtime.vae`)."""
        set_vae_tiling(self.vae, tile, overlap)
        self.vae_tile = tile

    def workload(self, task: str, width: int = 0, height: int = 0, nfe: int | None = None,
                 max_new_tokens: int = 1024, num_images: int = 1) -> Workload:
        return Workload(task, width=width or 1024, height=height or 1024, nfe=nfe, num_images=num_images,
                        max_new_tokens=max_new_tokens, device_type=self.device.type,
                        dtype_bytes=torch.finfo(self.dtype).bits // 8,
                        vae_dtype_bytes=torch.finfo(self.vae.dtype).bits // 8, vae_tile=self.vae_tile)

    def _phase(self, name: str) -> None:
        self.offload.enter_phase(name)
        for listener in self.phase_listeners:
            listener(name)

    def _bar(self, total: int, desc: str) -> Any:
        return progress_bar(total, desc, self.progress)

    # -- conditions -----------------------------------------------------------------------------------

    def _llm_inputs(self, text: str, images: list[Image.Image], generation: bool) -> torch.Tensor:
        """Prompt text + images -> [1, L, H] LLM input embeddings, truncated from the left."""
        ids = tokenize_with_images(self.tokenizer, text).to(self.device)
        visual: list[torch.Tensor] = []
        if images:  # through the vision cache: an edit's source image is encoded once for its two conditions
            prep = generation_vision_input if generation else preprocess_image
            visual, _ = visual_embeddings(self.model, [prep(img, self.pp) for img in images], self.device,
                                          self.caches.vision)
        embeds = self.model.merge_multimodal(ids, visual)
        return truncate_left(embeds, self.model.config.multimodal_max_length)

    @torch.no_grad()
    def condition(self, content: str, image: Image.Image) -> Condition:
        """ViT + LLM condition for one (content, image) pair, refined once for all steps."""
        txt = self.model.condition(self._llm_inputs(generation_prompt(content), [image], generation=True))
        return Condition(self.refine(txt))

    def refine(self, txt: torch.Tensor) -> RefinedText:
        return self.model.visual_generator.backbone.refine(txt.to(self.device))

    def _conditions(self, stats: RunStats, specs: list[tuple[str, str, Image.Image]]) -> dict[str, Condition]:
        self._phase("conditions")
        t0 = time.perf_counter()
        out: dict[str, Condition] = {}
        with self._bar(len(specs), "conditions") as bar:
            for name, content, img in specs:  # cached by (content, image): a repeat skips ViT, LLM and refiner
                out[name] = Condition(refined_condition(self.caches.conditions, content, img, self.condition))
                bar.update(1)
        stats.phases["conditions"] = time.perf_counter() - t0
        return out

    # -- understanding --------------------------------------------------------------------------------

    def understand(self, images: list[Image.Image] | Image.Image | None, question: str, max_new_tokens: int = 1024,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, stream: bool = False,
                   history: list[Turn] | None = None, seed: int = 42) -> str | Iterator[str]:
        """Answer a question about zero or more images; greedy unless `do_sample`.

        As in the reference, `images` is the whole conversation's list: the images of the `history`
        turns (each turn says how many it had) first, then the current question's.
        """
        check_text("question", question)
        check_max_new_tokens(max_new_tokens, self.model.config.answer_token_limit)
        if do_sample:
            check_temperature(temperature)
            check_probability("top_p", top_p)
        check_seed(seed, allow_none=False)
        imgs = as_images(images, "images")
        earlier = sum(turn.num_images for turn in history or [])
        if earlier > len(imgs):
            raise InputError(f"the history's turns have {earlier} image(s) but only {len(imgs)} were given; pass "
                             "the whole conversation's images, earlier turns first")
        start = time.perf_counter()
        self._start_peaks()
        w = max((img.size[0] for img in imgs), default=448)
        h = max((img.size[1] for img in imgs), default=448)
        wl = self.workload("understand", w, h, max_new_tokens=max_new_tokens, num_images=max(len(imgs), 1))
        stats = RunStats(task="understand", settings={"max_new_tokens": max_new_tokens, "do_sample": do_sample})
        prompt = understanding_prompt(question, len(imgs) - earlier, history)
        sampling = Sampling(do_sample, temperature, top_p, seed)

        def pieces() -> Iterator[str]:
            self._phase("conditions")
            yield from answer(self, prompt, imgs, sampling, max_new_tokens, stats, start)
            self._finish(stats, start)

        if stream:  # tokens already shown cannot be taken back, so a stream is not retried
            self.offload.prepare(wl)
            return pieces()
        return self.offload.run(wl, lambda: "".join(pieces()))

    # -- generation -----------------------------------------------------------------------------------

    def _sampling(self, steps: int | None, solver: str | None, spacing: str | None,
                  cfg_interval: Any) -> tuple[int, str, str, tuple[float, float] | None]:
        return resolve_sampling(self.sampling_defaults(), steps, solver, spacing, cfg_interval)

    def timesteps(self, steps: int, n_tokens: int, spacing: str = "linear") -> list[float]:
        return flow_timesteps(self.model.config.yak, steps, n_tokens, spacing)

    def generate(self, prompt: str, width: int = 1024, height: int = 1024, steps: int | None = None, seed: int = 42,
                 txt_cfg: float = 5.0, solver: str | None = None, spacing: str | None = None,
                 cfg_interval: tuple[float, float] | None | Literal["preset"] = PRESET, negative_prompt: str = "",
                 num_images: int | None = None, callback: StepCallback | None = None) -> Image.Image | list[Image.Image]:
        """Text-to-image with 2-pass CFG (cond, no_both); the latent is W x H floored to multiples of 16.

        `negative_prompt` replaces the text of the unconditional (no_both) branch, the reference's
        "Generate an image." by default. `num_images=N` returns N images with seeds seed..seed+N-1.
        """
        check_text("prompt", prompt)
        for name, side in (("width", width), ("height", height)):
            check_positive_int(name, side, MIN_SIDE, MAX_SIDE)
        check_cfg("txt_cfg", txt_cfg)
        check_seed(seed, allow_none=False)
        steps, solver, spacing, interval = self._sampling(steps, solver, spacing, cfg_interval)
        out_w, out_h = t2i_size(width, height)
        stats = RunStats(task="t2i", steps=steps, width=out_w, height=out_h)
        canvas = white_canvas(width, height)  # the reference's canvas: the requested size, not the floored one
        specs = [("cond", T2I_PREFIX + prompt, canvas), ("no_both", unconditional(negative_prompt), canvas)]
        settings = dict(prompt=prompt, negative_prompt=negative_prompt, steps=steps, txt_cfg=txt_cfg, solver=solver,
                        spacing=spacing, cfg_interval=list(interval) if interval else None)
        return self._images("t2i", stats, specs, None, (out_w, out_h), (width, height), Guidance(txt_cfg, 0.0, interval),
                            steps, solver, spacing, seed, num_images, callback, settings)

    def edit(self, image: Image.Image, instruction: str, steps: int | None = None, seed: int = 42,
             img_cfg: float = 1.5, txt_cfg: float = 6.0, solver: str | None = None, spacing: str | None = None,
             cfg_interval: tuple[float, float] | None | Literal["preset"] = PRESET, latent: str = "mean",
             negative_prompt: str = "", num_images: int | None = None,
             callback: StepCallback | None = None) -> Image.Image | list[Image.Image]:
        """Instruction editing with 3-pass CFG; output size is smart_resize(factor 32) of the input.

        `negative_prompt` replaces the text of the two unconditional-text branches (no_txt, with the
        source image, and no_both, with the white canvas). The input is VAE-encoded deterministically:
        `latent="mean"` uses the posterior mean (the reference samples it); `latent="sample"` draws a
        sample seeded by `seed`.
        """
        check_text("instruction", instruction)
        check_cfg("img_cfg", img_cfg)
        check_cfg("txt_cfg", txt_cfg)
        steps, solver, spacing, interval = self._sampling(steps, solver, spacing, cfg_interval)
        if latent not in ("mean", "sample"):
            raise InputError(f"latent must be 'mean' or 'sample', got {latent!r}")
        image = as_image(image, "image")
        check_seed(seed, allow_none=False)
        width, height = edit_output_size(*image.size)
        stats = RunStats(task="edit", steps=steps, width=width, height=height)
        source = stretch(image, width, height)
        negative = unconditional(negative_prompt)
        specs = [("cond", instruction.strip(), source), ("no_both", negative, white_canvas(width, height)),
                 ("no_txt", negative, source)]
        settings = dict(prompt=instruction, negative_prompt=negative_prompt, steps=steps, txt_cfg=txt_cfg,
                        img_cfg=img_cfg, solver=solver, spacing=spacing, latent=latent,
                        cfg_interval=list(interval) if interval else None)
        return self._images("edit", stats, specs, (source, latent), (width, height), image.size,
                            Guidance(txt_cfg, img_cfg, interval), steps, solver, spacing, seed, num_images, callback,
                            settings)

    def _images(self, task: str, stats: RunStats, specs: list[tuple[str, str, Image.Image]],
                edit_source: tuple[Image.Image, str] | None, size: tuple[int, int], planned_size: tuple[int, int],
                guidance: Guidance, steps: int, solver: str, spacing: str, seed: int, num_images: int | None,
                callback: StepCallback | None, settings: dict[str, Any]) -> Image.Image | list[Image.Image]:
        """Conditions once, then per image: noise from its seed, denoise, decode."""
        count = 1 if num_images is None else num_images
        check_positive_int("num_images", count, 1, 64)
        check_positive_int("seed", seed, 0, 2**63 - count)
        width, height = size
        start = time.perf_counter()
        self._start_peaks()
        nfe = self.planned_nfe(task, steps, solver, spacing, guidance.interval, width * height)

        def run() -> list[Image.Image]:
            conditions = self._conditions(stats, specs)
            if edit_source is not None:
                cond_latent = self.encode_image(edit_source[0], edit_source[1], seed)
                cond_ids = latents.image_ids(height // 16, width // 16, index=1, device=self.device)
                for name in ("cond", "no_txt"):
                    conditions[name].cond_latent, conditions[name].cond_ids = cond_latent, cond_ids
            out = []
            for i in range(count):
                noise = latents.latent_noise(height, width, seed + i, self.device, self.dtype)
                out.append(self._denoise_and_decode(stats, noise, conditions, guidance, steps, solver, spacing,
                                                    callback))
            return out

        images = self.offload.run(self.workload(task, *planned_size, nfe=nfe), run)
        stats.settings = settings | {"seed": seed}
        if num_images is not None:
            stats.settings["seeds"] = [seed + i for i in range(count)]
        if self.preset is not None:
            stats.settings["preset"] = self.preset.name
        self._finish(stats, start)
        for i, image in enumerate(images):
            image.info.update(nfe=stats.nfe, seed=seed + i)
        return images[0] if num_images is None else images

    def encode_image(self, image: Image.Image, mode: str = "mean", seed: int = 42) -> torch.Tensor:
        """Packed, scaled VAE latent of an image already at the output size."""
        self._phase("decode")
        return encode_image(self.vae, image, self.model.config.vae_scaling_factor, mode, seed, self.device,
                            self.dtype)

    def _denoise_and_decode(self, stats: RunStats, noise: torch.Tensor, conditions: dict[str, Condition],
                            guidance: Guidance, steps: int, solver: str, spacing: str,
                            callback: StepCallback | None = None) -> Image.Image:
        _, _, h, w = noise.shape
        rows, cols = h // 2, w // 2
        timesteps = self.timesteps(steps, rows * cols, spacing)
        t0 = time.perf_counter()
        final = self.denoise(latents.pack(noise), rows, cols, conditions, guidance, timesteps, solver, stats, callback)
        stats.phases["denoise"] = stats.phases.get("denoise", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        image = self.decode(final, rows, cols)
        stats.phases["decode"] = stats.phases.get("decode", 0.0) + time.perf_counter() - t0
        return image

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, rows: int, cols: int, conditions: dict[str, Condition], guidance: Guidance,
                timesteps: list[float], solver: str = "euler", stats: RunStats | None = None,
                callback: StepCallback | None = None) -> torch.Tensor:
        """Integrate from packed noise to a packed latent with 2-pass (t2i) or 3-pass (edit) CFG."""
        self._phase("denoise")
        with self._bar(len(timesteps) - 1, "denoise") as bar:
            out, calls = guided_denoise(self.model.visual_generator.backbone, x, rows, cols, conditions, guidance,
                                        timesteps, solver, lambda: bar.update(1), callback)
        if stats is not None:
            stats.nfe += calls
        return out

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

    # -- bookkeeping ----------------------------------------------------------------------------------

    def _start_peaks(self) -> None:
        """Reset the device peak; sample the host's anonymous and mapped peaks until `_finish`."""
        reset_device_peak(self.device)
        if self._host_peaks is not None:
            self._host_peaks.stop()  # a run that raised never reached `_finish`
        self._host_peaks = HostPeakSampler(interval=0.02, exact=False).start()

    def _finish(self, stats: RunStats, start: float) -> RunStats:
        stats.seconds = time.perf_counter() - start
        stats.peak_device_bytes = device_peak_bytes(self.device)
        stats.peak_rss_bytes = peak_rss_bytes()
        if self._host_peaks is not None:
            host, self._host_peaks = self._host_peaks.stop(), None
            stats.peak_anon_bytes, stats.peak_mapped_bytes = host.peak_anon, host.peak_mapped
        stats.cache.update(self.caches.stats())
        stats.settings.setdefault("dtype", dtype_label(self.dtype))
        if self.device.type == "cpu":
            plan = {"cpu_plan": self.cpu_hooks.plan_dict()} if self.cpu_hooks is not None else {}
            stats.machine = {**detect().to_dict(), "compute": self.compute_reason, **plan}
        self.last_run = stats
        return stats

    def planned_nfe(self, task: str, steps: int, solver: str = "euler", spacing: str = "linear",
                    cfg_interval: tuple[float, float] | None = None, pixels: int = 1024 * 1024) -> int:
        """MMDiT evaluations per image: the conditional pass at every evaluation, the others only
        where guidance is active (the evaluation times are those the solver visits)."""
        passes = self.model.architecture.cfg_passes[task]
        return guided_nfe(passes, solver, spacing, steps, cfg_interval, max(pixels // 256, 1))
