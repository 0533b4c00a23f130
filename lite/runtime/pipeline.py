"""One object for the three tasks: understand, generate (text-to-image) and edit.

Every task runs in phases with clean boundaries, so that an offloader can move components:

    conditions  (ViT + visual head + VTE + LLM)  ->  denoise (Yak)  ->  decode (VAE)

Unlike the reference, the token refiner runs once per condition (not at every step), the RoPE
table is built once per condition, and nothing needs flash-attn, CUDA or float64 on the device.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from lite.model import latents
from lite.model.config import PreprocessorConfig, load_preprocessor_config
from lite.errors import InputError
from lite.runtime.devices import dtype_name, resolve_device, resolve_dtype
from lite.model.checkpoint import LoadReport, find_checkpoint, load_model
from lite.memory import device_peak_bytes, peak_rss_bytes, reset_device_peak
from lite.model.modeling_ovis_u1 import OvisU1
from lite.model.modeling_yak import RefinedText
from lite.model.processing import (
    T2I_PREFIX,
    UNCONDITIONAL_PROMPT,
    Turn,
    concat_vision,
    edit_output_size,
    generation_prompt,
    generation_vision_input,
    preprocess_image,
    stretch,
    t2i_size,
    tokenize_with_images,
    truncate_left,
    understanding_prompt,
    validate_image,
    vae_pixels,
    white_canvas,
)
from lite.sampling import SOLVERS, SPACINGS, reference_schedule, sample, time_shift_mu
from lite.model.tokenizer import load_tokenizer
from lite.validation import MAX_SIDE, MIN_SIDE, check_cfg, check_positive_int, check_text

PhaseListener = Callable[[str], None]
OOM_RETRY_FACTOR = 0.75


@dataclass
class OffloadSettings:
    """Page weights through the device inside `budget_bytes` (see `offload/`)."""

    budget_bytes: int
    prefetch_depth: int = 1
    simulate: bool = False  # CPU test mode: offloaded weights become loud placeholders


@dataclass
class Condition:
    """A refined LLM condition plus, for edits, the packed condition-image latent."""

    text: RefinedText
    cond_latent: torch.Tensor | None = None
    cond_ids: torch.Tensor | None = None
    table: torch.Tensor | None = None  # RoPE table, built on first use and reused every step


@dataclass(frozen=True)
class Guidance:
    """CFG scales, and optionally the interval of t in which guidance applies (elsewhere: cond only)."""

    txt_cfg: float
    img_cfg: float = 0.0
    interval: tuple[float, float] | None = None

    def active(self, t: float) -> bool:
        return self.interval is None or self.interval[0] <= t <= self.interval[1]


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
    peak_rss_bytes: int = 0
    phases: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


class OvisPipeline:
    """Ovis-U1 understanding, text-to-image and editing on cpu, cuda or mps."""

    def __init__(self, model: OvisU1, tokenizer: Any, preprocessor: PreprocessorConfig,
                 device: torch.device, progress: bool = True, load_report: LoadReport | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.pp = preprocessor
        self.device = device
        self.progress = progress
        self.load_report = load_report
        self.phase_listeners: list[PhaseListener] = []
        self.last_run: RunStats | None = None
        self.model_id = "AIDC-AI/Ovis-U1-3B"
        self.offload: OffloadSettings | None = None
        self.offloader: Any = None
        self.offload_plan: Any = None
        self._offload_key: tuple[Any, ...] | None = None
        self.vae_tile: int | None = None  # decode/encode tile side (px); None = untiled
        self.preset: Any = None
        self.notify: Callable[[str], None] = lambda message: None

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device = "auto",
                        dtype: str | torch.dtype | None = "auto", vae_dtype: torch.dtype = torch.float32,
                        preset: Any = None, budget_bytes: int | None = None,
                        progress: bool = True) -> "OvisPipeline":
        """Load a checkpoint directory (or the HF cache, or a pre-quantized checkpoint).

        Without a preset: every weight in `dtype` (bf16 by default), the VAE in fp32 like the reference.
        With a preset (a name or a `lite.runtime.presets.Preset`): its precision policy is applied while the
        tensors stream in, its VAE tiling is set, and on CUDA/MPS the weights stay on the host and
        page through the device inside `budget_bytes` (default: the preset's budget).
        """
        directory = find_checkpoint(path)
        dev, _notice = resolve_device(device)
        if preset is None:
            from lite.model.quantization import is_quantized_checkpoint, load_quantized_model

            if is_quantized_checkpoint(directory):
                model, report = load_quantized_model(directory, device=dev, progress=progress)
            else:
                compute = resolve_dtype(dtype, dev)

                def dtype_for(name: str) -> torch.dtype:
                    return vae_dtype if name.startswith("visual_generator.vae.") else compute

                model, report = load_model(directory, device=dev, dtype=dtype_for, progress=progress)
            pipe = cls(model, load_tokenizer(directory), load_preprocessor_config(directory), dev, progress, report)
            pipe.model_id = str(directory)
            return pipe
        from lite.runtime.presets import get_preset
        from lite.model.quantization import load_quantized_model, policy_for

        preset = get_preset(preset) if isinstance(preset, str) else preset
        budget = budget_bytes if budget_bytes is not None else preset.budget_bytes
        paging = preset.offload and budget is not None and dev.type in ("cuda", "mps")
        host = torch.device("cpu") if paging else dev
        override = None if dtype in (None, "auto") else resolve_dtype(dtype, dev)
        model, report = load_quantized_model(directory, policy_for(preset.quant, dev.type), device=host,
                                             dtype=override, progress=progress)
        pipe = cls(model, load_tokenizer(directory), load_preprocessor_config(directory), dev, progress, report)
        pipe.model_id = str(directory)
        pipe.preset = preset
        pipe.set_vae_tiling(preset.vae_tile)
        if paging:
            pipe.enable_offload(budget)
        return pipe

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual_generator.backbone.img_in.weight.dtype

    @property
    def vae(self):
        return self.model.visual_generator.vae

    def _phase(self, name: str) -> None:
        if self.offloader is not None:
            self.offloader.enter_phase(name)
        for listener in self.phase_listeners:
            listener(name)

    # -- offloading --------------------------------------------------------------------------------

    def enable_offload(self, budget_bytes: int, prefetch_depth: int = 1, simulate: bool = False) -> None:
        """Plan and page the weights inside `budget_bytes` of device memory, per task and size.

        The weights must be on the host (CPU); `self.device` is where compute runs. On CPU the
        offloader only accounts (or, with `simulate`, really drops and restores weights).
        """
        self.disable_offload()
        self.offload = OffloadSettings(int(budget_bytes), prefetch_depth, simulate)
        if self.device.type == "cuda":
            # Paging frees and reallocates units of different sizes every pass; with the default
            # caching allocator that fragmentation (64-140 MiB, measured on an H100) overflowed
            # 1-2 GB cards. Expandable segments remove it (docs/offload.md).
            try:
                torch.cuda.memory._set_allocator_settings("expandable_segments:True")
            except (AttributeError, RuntimeError):
                pass

    def disable_offload(self) -> None:
        if self.offloader is not None:
            self.offloader.remove()
        self.offload = self.offloader = self.offload_plan = self._offload_key = None

    def workload(self, task: str, width: int = 0, height: int = 0, nfe: int | None = None,
                 max_new_tokens: int = 1024, num_images: int = 1) -> Any:
        from lite.model.memory_profile import Workload

        return Workload(task, width=width or 1024, height=height or 1024, nfe=nfe, num_images=num_images,
                        max_new_tokens=max_new_tokens, device_type=self.device.type,
                        dtype_bytes=torch.finfo(self.dtype).bits // 8,
                        vae_dtype_bytes=torch.finfo(self.vae.dtype).bits // 8, vae_tile=self.vae_tile)

    def plan_for(self, wl: Any, budget_bytes: int | None = None) -> Any:
        """The offload plan for a workload on this model (sizes are the real, possibly quantized, bytes)."""
        from lite.model.memory_profile import activation_bytes, plan_units

        budget = budget_bytes if budget_bytes is not None else self.offload.budget_bytes
        act = activation_bytes(self.model.config, self.pp, wl)
        return plan_units(self.model, wl, act, budget, self.offload.prefetch_depth)

    def _prepare_offload(self, wl: Any) -> None:
        if self.offload is None:
            return
        from offload import attach_offload

        key = (wl.task, wl.output_size if wl.task != "understand" else None, wl.model_evaluations,
               self.offload.budget_bytes)
        if self.offloader is not None and key == self._offload_key:
            return
        if self.offloader is not None:
            self.offloader.remove()
            self.offloader = None
        units, plan = self.plan_for(wl)
        self.offloader = attach_offload(units, plan, self.device, simulate=self.offload.simulate)
        self.offload_plan, self._offload_key = plan, key

    def _run_with_retry(self, wl: Any, run: Callable[[], Any]) -> Any:
        """Run a task; on a device OOM, retry once with a plan for a smaller budget."""
        self._prepare_offload(wl)
        try:
            return run()
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            current = self.offload.budget_bytes if self.offload else self._device_total_bytes()
            smaller = int(current * OOM_RETRY_FACTOR)
            self.notify(f"out of device memory with a {current / 2**30:.2f} GiB plan; retrying once "
                        f"with a {smaller / 2**30:.2f} GiB plan")
            prefetch = self.offload.prefetch_depth if self.offload else 1
            simulate = self.offload.simulate if self.offload else False
            self.enable_offload(smaller, prefetch, simulate)
            self._prepare_offload(wl)
            try:
                return run()
            except torch.OutOfMemoryError:
                raise InputError(f"out of device memory even with a {smaller / 2**30:.2f} GiB plan; "
                                 f"choose a smaller preset or resolution") from None

    def set_vae_tiling(self, tile: int | None, overlap: float = 0.25) -> None:
        """Decode and encode in overlapping, blended tiles of `tile` px once an image side exceeds it.

        Uses diffusers' AutoencoderKL tiling. Tiles are normalised on their own (GroupNorm statistics
        and the mid-block attention are per tile), so tiling trades exactness for a bounded peak:
        it is off unless a preset or the user asks for it.
        """
        if tile is None:
            self.vae.disable_tiling()
            self.vae_tile = None
            return
        if tile < 64 or tile % 8:
            raise InputError(f"VAE tile must be a multiple of 8 and >= 64 px, got {tile}")
        self.vae.enable_tiling()
        self.vae.tile_sample_min_size = tile
        self.vae.tile_latent_min_size = tile // 8
        self.vae.tile_overlap_factor = overlap
        self.vae_tile = tile

    def _device_total_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.get_device_properties(self.device).total_memory)
        from offload import module_nbytes

        return module_nbytes(self.model)

    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False)

    def _llm_inputs(self, text: str, images: list[Image.Image], generation: bool) -> torch.Tensor:
        """Prompt text + images -> [1, L, H] LLM input embeddings, truncated from the left."""
        ids = tokenize_with_images(self.tokenizer, text).to(self.device)
        visual: list[torch.Tensor] = []
        if images:
            prep = generation_vision_input if generation else preprocess_image
            vis = concat_vision([prep(img, self.pp) for img in images])
            vit_dtype = self.model.visual_tokenizer.backbone.preprocessor.patchifier.proj.weight.dtype
            visual = self.model.visual_embeddings(vis.pixel_values.to(self.device, vit_dtype),
                                                  vis.grid_thws.to(self.device))
        embeds = self.model.merge_multimodal(ids, visual)
        return truncate_left(embeds, self.model.config.multimodal_max_length)

    @torch.no_grad()
    def condition(self, content: str, image: Image.Image) -> Condition:
        """ViT + LLM condition for one (content, image) pair, refined once for all steps."""
        txt = self.model.condition(self._llm_inputs(generation_prompt(content), [image], generation=True))
        return Condition(self.refine(txt))

    def refine(self, txt: torch.Tensor) -> RefinedText:
        return self.model.visual_generator.backbone.refine(txt.to(self.device))

    # -- understanding ----------------------------------------------------------------------------

    def understand(self, images: list[Image.Image] | Image.Image | None, question: str, max_new_tokens: int = 1024,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, stream: bool = False,
                   history: list[Turn] | None = None, seed: int = 42) -> str | Iterator[str]:
        """Answer a question about zero or more images; greedy unless `do_sample`."""
        check_text("question", question)
        check_positive_int("max_new_tokens", max_new_tokens)
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
            raise InputError("sampling needs temperature > 0 and 0 < top_p <= 1")
        imgs = [images] if isinstance(images, Image.Image) else list(images or [])
        imgs = [validate_image(img, f"image {i + 1}") for i, img in enumerate(imgs)]
        start = time.perf_counter()
        reset_device_peak(self.device)
        w = max((img.size[0] for img in imgs), default=448)
        h = max((img.size[1] for img in imgs), default=448)
        wl = self.workload("understand", w, h, max_new_tokens=max_new_tokens, num_images=max(len(imgs), 1))
        stats = RunStats(task="understand", settings={"max_new_tokens": max_new_tokens, "do_sample": do_sample})

        def generate_kwargs() -> dict[str, Any]:
            self._phase("conditions")
            with torch.no_grad():
                embeds = self._llm_inputs(understanding_prompt(question, len(imgs), history), imgs, generation=False)
            kwargs: dict[str, Any] = dict(
                inputs_embeds=embeds, max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True,
                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device),
                eos_token_id=self.model.config.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
                torch.manual_seed(seed)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            return kwargs

        if stream:  # tokens already shown cannot be taken back, so a stream is not retried
            self._prepare_offload(wl)
            return self._stream(generate_kwargs(), stats, start)

        def run() -> str:
            with torch.no_grad():
                out = self.model.llm.generate(**generate_kwargs())
            return self.tokenizer.decode(out[0], skip_special_tokens=True)

        answer = self._run_with_retry(wl, run)
        self._finish(stats, start)
        return answer

    def _stream(self, kwargs: dict[str, Any], stats: RunStats, start: float) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        error: list[BaseException] = []

        def run() -> None:
            try:
                with torch.no_grad():
                    self.model.llm.generate(**kwargs, streamer=streamer)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                error.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        yield from streamer
        worker.join()
        if error:
            raise error[0]
        self._finish(stats, start)

    # -- generation ---------------------------------------------------------------------------------

    def _check_sampling(self, steps: int, solver: str, spacing: str) -> None:
        check_positive_int("steps", steps, 1, 1000)
        if solver not in SOLVERS:
            raise InputError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
        if spacing not in SPACINGS:
            raise InputError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")

    def timesteps(self, steps: int, n_tokens: int, spacing: str = "linear") -> list[float]:
        """The reference's shifted schedule for `linear`; the same μ shift for other spacings."""
        cfg = self.model.config.yak
        if spacing == "linear":
            return reference_schedule(steps, n_tokens, cfg.base_shift, cfg.max_shift, shift=cfg.timestep_shift)
        from lite.sampling import make_timesteps

        mu = time_shift_mu(n_tokens, cfg.base_shift, cfg.max_shift) if cfg.timestep_shift else None
        return list(make_timesteps(steps, spacing, mu))

    def generate(self, prompt: str, width: int = 1024, height: int = 1024, steps: int = 50, seed: int = 42,
                 txt_cfg: float = 5.0, solver: str = "euler", spacing: str = "linear",
                 cfg_interval: tuple[float, float] | None = None) -> Image.Image:
        """Text-to-image with 2-pass CFG (cond, no_both); W and H are floored to multiples of 16."""
        check_text("prompt", prompt)
        for name, side in (("width", width), ("height", height)):
            check_positive_int(name, side, MIN_SIDE, MAX_SIDE)
        check_cfg("txt_cfg", txt_cfg)
        self._check_sampling(steps, solver, spacing)
        width, height = t2i_size(width, height)
        start = time.perf_counter()
        reset_device_peak(self.device)
        stats = RunStats(task="t2i", steps=steps, width=width, height=height)
        guidance = Guidance(txt_cfg, 0.0, cfg_interval)

        def run() -> Image.Image:
            canvas = white_canvas(width, height)
            conditions = self._conditions(stats, [("cond", T2I_PREFIX + prompt, canvas),
                                                  ("no_both", UNCONDITIONAL_PROMPT, canvas)])
            noise = latents.latent_noise(height, width, seed, self.device, self.dtype)
            return self._denoise_and_decode(stats, noise, conditions, guidance, steps, solver, spacing)

        nfe = self.planned_nfe("t2i", steps, solver, spacing, cfg_interval, width * height)
        image = self._run_with_retry(self.workload("t2i", width, height, nfe=nfe), run)
        stats.settings = dict(prompt=prompt, seed=seed, steps=steps, txt_cfg=txt_cfg, solver=solver,
                              spacing=spacing, cfg_interval=list(cfg_interval) if cfg_interval else None)
        return self._finish_image(image, stats, start)

    def edit(self, image: Image.Image, instruction: str, steps: int = 50, seed: int = 42, img_cfg: float = 1.5,
             txt_cfg: float = 6.0, solver: str = "euler", spacing: str = "linear",
             cfg_interval: tuple[float, float] | None = None, latent: str = "mean") -> Image.Image:
        """Instruction editing with 3-pass CFG; output size is smart_resize(factor 32) of the input.

        The input is VAE-encoded deterministically: `latent="mean"` uses the posterior mean (the
        reference samples it); `latent="sample"` draws a sample seeded by `seed`.
        """
        check_text("instruction", instruction)
        check_cfg("img_cfg", img_cfg)
        check_cfg("txt_cfg", txt_cfg)
        self._check_sampling(steps, solver, spacing)
        if latent not in ("mean", "sample"):
            raise InputError(f"latent must be 'mean' or 'sample', got {latent!r}")
        image = validate_image(image)
        width, height = edit_output_size(*image.size)
        start = time.perf_counter()
        reset_device_peak(self.device)
        stats = RunStats(task="edit", steps=steps, width=width, height=height)
        guidance = Guidance(txt_cfg, img_cfg, cfg_interval)

        def run() -> Image.Image:
            source = stretch(image, width, height)
            conditions = self._conditions(stats, [("cond", instruction.strip(), source),
                                                  ("no_both", UNCONDITIONAL_PROMPT, white_canvas(width, height)),
                                                  ("no_txt", UNCONDITIONAL_PROMPT, source)])
            cond_latent = self.encode_image(source, latent, seed)
            cond_ids = latents.image_ids(height // 16, width // 16, index=1, device=self.device)
            for name in ("cond", "no_txt"):
                conditions[name].cond_latent, conditions[name].cond_ids = cond_latent, cond_ids
            noise = latents.latent_noise(height, width, seed, self.device, self.dtype)
            return self._denoise_and_decode(stats, noise, conditions, guidance, steps, solver, spacing)

        nfe = self.planned_nfe("edit", steps, solver, spacing, cfg_interval, width * height)
        out = self._run_with_retry(self.workload("edit", image.size[0], image.size[1], nfe=nfe), run)
        stats.settings = dict(prompt=instruction, seed=seed, steps=steps, txt_cfg=txt_cfg, img_cfg=img_cfg,
                              solver=solver, spacing=spacing, latent=latent,
                              cfg_interval=list(cfg_interval) if cfg_interval else None)
        return self._finish_image(out, stats, start)

    def _conditions(self, stats: RunStats, specs: list[tuple[str, str, Image.Image]]) -> dict[str, Condition]:
        self._phase("conditions")
        t0 = time.perf_counter()
        out: dict[str, Condition] = {}
        with self._bar(len(specs), "conditions") as bar:
            for name, content, img in specs:
                out[name] = self.condition(content, img)
                bar.update(1)
        stats.phases["conditions"] = time.perf_counter() - t0
        return out

    @torch.no_grad()
    def encode_image(self, image: Image.Image, mode: str = "mean", seed: int = 42) -> torch.Tensor:
        """Packed, scaled VAE latent of an image already at the output size."""
        self._phase("decode")
        pixels = vae_pixels(image).to(self.device, self.vae.dtype)
        dist = self.vae.encode(pixels).latent_dist
        if mode == "mean":
            z = dist.mean
        else:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen, device=self.device,
                                                   dtype=dist.mean.dtype)
        return latents.pack(z * self.model.config.vae_scaling_factor).to(self.dtype)

    def _denoise_and_decode(self, stats: RunStats, noise: torch.Tensor, conditions: dict[str, Condition],
                            guidance: Guidance, steps: int, solver: str, spacing: str) -> Image.Image:
        _, _, h, w = noise.shape
        n_tokens = (h // 2) * (w // 2)
        timesteps = self.timesteps(steps, n_tokens, spacing)
        t0 = time.perf_counter()
        final = self.denoise(latents.pack(noise), h // 2, w // 2, conditions, guidance, timesteps, solver, stats)
        stats.phases["denoise"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        image = self.decode(final, h // 2, w // 2)
        stats.phases["decode"] = time.perf_counter() - t0
        return image

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, rows: int, cols: int, conditions: dict[str, Condition], guidance: Guidance,
                timesteps: list[float], solver: str = "euler", stats: RunStats | None = None) -> torch.Tensor:
        """Integrate from packed noise to a packed latent with 2-pass (t2i) or 3-pass (edit) CFG."""
        self._phase("denoise")
        yak = self.model.visual_generator.backbone
        img_ids = latents.image_ids(rows, cols, device=self.device)
        calls = 0

        def f(x_t: torch.Tensor, t_vec: torch.Tensor, cond: Condition) -> torch.Tensor:
            nonlocal calls
            calls += 1
            ids = img_ids if cond.cond_latent is None else torch.cat([img_ids, cond.cond_ids], 1)
            if cond.table is None:
                cond.table = yak.rope(cond.text.txt_fea.shape[1], ids)
            return yak(x_t, img_ids, cond.text, t_vec, cond.cond_latent, cond.cond_ids, table=cond.table)

        def velocity(x_t: torch.Tensor, t: float) -> torch.Tensor:
            t_vec = torch.full((x_t.shape[0],), t, dtype=x_t.dtype, device=x_t.device)
            v_c = f(x_t, t_vec, conditions["cond"])
            if not guidance.active(t):
                return v_c
            v_nb = f(x_t, t_vec, conditions["no_both"])
            if "no_txt" not in conditions:
                return v_nb + guidance.txt_cfg * (v_c - v_nb)
            v_nt = f(x_t, t_vec, conditions["no_txt"])
            return v_nb + guidance.img_cfg * (v_nt - v_nb) + guidance.txt_cfg * (v_c - v_nt)

        with self._bar(len(timesteps) - 1, "denoise") as bar:
            out = sample(velocity, x, None, solver=solver, timesteps=timesteps,
                         callback=lambda *_: bar.update(1))
        if stats is not None:
            stats.nfe = calls
        return out

    @torch.no_grad()
    def decode(self, packed: torch.Tensor, rows: int, cols: int) -> Image.Image:
        """Unpack, divide by the scaling factor (no shift), VAE-decode, clamp and truncate to uint8."""
        self._phase("decode")
        with self._bar(1, "decode") as bar:
            z = latents.unpack(packed.float(), rows, cols) / self.model.config.vae_scaling_factor
            decoded = self.vae.decode(z.to(self.vae.dtype)).sample
            bar.update(1)
        return Image.fromarray(latents.to_uint8(decoded).cpu().numpy())

    # -- bookkeeping ------------------------------------------------------------------------------

    def _finish(self, stats: RunStats, start: float) -> RunStats:
        stats.seconds = time.perf_counter() - start
        stats.peak_device_bytes = device_peak_bytes(self.device)
        stats.peak_rss_bytes = peak_rss_bytes()
        stats.settings.setdefault("dtype", dtype_name(self.dtype))
        self.last_run = stats
        return stats

    def _finish_image(self, image: Image.Image, stats: RunStats, start: float) -> Image.Image:
        self._finish(stats, start)
        image.info["nfe"] = stats.nfe
        return image

    def planned_nfe(self, task: str, steps: int, solver: str = "euler", spacing: str = "linear",
                    cfg_interval: tuple[float, float] | None = None, pixels: int = 1024 * 1024) -> int:
        """MMDiT evaluations per image: the conditional pass at every evaluation, the others only
        where guidance is active (the evaluation times are those the solver visits)."""
        from lite.runtime.presets import guided_nfe

        return guided_nfe(task, solver, spacing, steps, cfg_interval, max(pixels // 256, 1))
