"""One object for the three tasks: understand, generate (text-to-image) and edit.

Every task runs in phases with clean boundaries, so that an offloader can move components:

    conditions  (ViT + visual head + VTE + LLM)  ->  denoise (Yak)  ->  decode (VAE)  |  answer (LLM)

Loading takes a `ResolvedRun` (`lite.runtime.resolve`); every task returns a value (`lite.runtime.results`).
This file holds loading, the shared state and understanding; generate/edit live in `lite.runtime.image_tasks`,
paging in `OffloadSession`, planning in `lite.runtime.planning`. Nothing needs flash-attn, CUDA or float64.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from lite.errors import InputError
from lite.memory import HostPeakSampler, device_peak_bytes, peak_rss_bytes, reset_device_peak
from lite.model.checkpoint import LoadReport, model_id_of
from lite.model.config import PreprocessorConfig
from lite.model.images import as_images
from lite.model.memory_profile import Workload
from lite.model.modeling_ovis_u1 import OvisU1
from lite.model.processing import (Turn, generation_vision_input, preprocess_image, tokenize_with_images,
                                   truncate_left, understanding_prompt)
from lite.model.tokenizer import load_tokenizer
from lite.progress import progress_bar
from lite.runtime.caches import RuntimeCaches
from lite.runtime.cpu.install import CpuHooks, install_cpu_plan
from lite.runtime.cpu.plan import CpuPlan
from lite.runtime.cpu.probes import this_machine_plan
from lite.runtime.decode import Sampling
from lite.runtime.host_pages import PhasePageRelease
from lite.runtime.devices import dtype_label
from lite.runtime.hardware import detect
from lite.runtime.image_tasks import ImageTasks
from lite.runtime.llama_engine import LlamaCppLLM
from lite.runtime.loading import load_weights
from lite.runtime.offload_session import OffloadSession
from lite.runtime.presets import Preset
from lite.runtime.resolve import ResolvedRun, resolve
from lite.runtime.results import AnswerResult, AnswerStream, RunStats
from lite.runtime.understanding import answer
from lite.runtime.vae import set_vae_tiling
from lite.runtime.vision import visual_embeddings
from lite.validation import check_max_new_tokens, check_probability, check_seed, check_temperature, check_text

PhaseListener = Callable[[str], None]
REFERENCE_SAMPLING: dict[str, Any] = {"steps": 50, "solver": "euler", "spacing": "linear", "cfg_interval": None}


class OvisPipeline(ImageTasks):
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
        self.last_run: RunStats | None = None  # a convenience: the stats of the last finished call (its result's)
        self._host_peaks: HostPeakSampler | None = None  # the running call's host memory sampler
        self.model_id = "AIDC-AI/Ovis-U1-3B"
        self.vae_tile: int | None = None  # decode/encode tile side (px); None = untiled
        self.preset: Preset | None = None
        self.compute_dtype: torch.dtype | None = None  # set when compute differs from the stored weights
        self.compute_reason: str | None = None  # why this compute dtype, for the load report
        self.cpu_plan: CpuPlan | None = None  # on a CPU: the kernels this process runs, each with its reason
        self.cpu_hooks: CpuHooks | None = None  # what the plan hooked on this model (removable; `plan_dict()`)
        self.llm_engine: Any = None  # None: our LLM answers; else a `lite.runtime.llama_engine.LlamaCppLLM`
        self.caches = RuntimeCaches()  # vision, prefix KV and conditions kept between calls (lite.runtime.caches)
        self.notify: Callable[[str], None] = lambda message: None
        self.offload = OffloadSession(model, preprocessor, device, lambda message: self.notify(message),
                                      reach=lambda: self.caches.reach_bytes, release=lambda: self.caches.clear(),
                                      limit=lambda n: self.caches.limit(n))

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device = "auto",
                        dtype: str | torch.dtype | None = "auto", vae_dtype: torch.dtype = torch.float32,
                        preset: str | Preset | None = None, budget_bytes: int | None = None,
                        progress: bool = True, cache: bool = True, llm_engine: str = "torch") -> "OvisPipeline":
        """Load a checkpoint directory (or the HF cache, or a pre-quantized checkpoint).

        Without a preset: every weight in `dtype` (bf16 by default), the VAE in fp32 like the reference,
        and the reference's sampler. With a preset (a name or a `Preset`): its precision is applied while
        the tensors stream in, its sampler becomes the default of `generate`/`edit`, its VAE tiling is set,
        and on CUDA/MPS the weights stay on the host and page through the device inside `budget_bytes`
        (default: the preset's budget). An accelerator asked for by name must exist. `cache=False` turns
        the caches between calls off (`pipe.caches`: vision, prefix KV, conditions). `llm_engine="llama.cpp"`
        (or `"llama.cpp:q8_0"`...) runs understanding's LLM through llama.cpp on the CPU (optional package).
        """
        pipe = cls.load(resolve(path, device, dtype, vae_dtype, preset, budget_bytes, progress, llm_engine))
        pipe.caches.set_enabled(cache)
        return pipe

    @classmethod
    def load(cls, run: ResolvedRun) -> "OvisPipeline":
        """Load what `run` resolved, as it is (the CLI and `from_pretrained` both end here)."""
        tokenizer = load_tokenizer(run.directory)  # after the file checks of `resolve`, before any weight
        model, report, budget = load_weights(run)
        pipe = cls(model, tokenizer, run.preprocessor, run.device, run.progress, report)
        pipe.model_id = model_id_of(run.directory)
        if run.preset is not None:
            pipe.preset = run.preset
            pipe.set_vae_tiling(run.preset.vae_tile)
        if budget is not None:
            pipe.enable_offload(budget)
        if run.device.type == "cpu":  # the CPU plan's kernels, as hooks (paging takes off what it must by itself)
            if budget is None:  # each phase's unused checkpoint pages leave the RSS (lite.runtime.host_pages)
                pipe.phase_listeners.append(PhasePageRelease(model))
            pipe.cpu_plan, auto = this_machine_plan(), run.dtype is None
            pipe.cpu_hooks = install_cpu_plan(model, pipe.cpu_plan, auto_dtype=auto)
            pipe.compute_dtype = pipe.cpu_hooks.compute_dtype
            pipe.compute_reason = pipe.cpu_plan.compute.reason if auto else None
        if run.llm_engine.name == "llama.cpp":  # optional: the GGUF is exported once per checkpoint and format
            pipe.llm_engine = LlamaCppLLM.open(run.directory, run.config, run.llm_engine.gguf_format,
                                               lambda message: pipe.notify(message))
        return pipe

    # -- state --------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (weights may be stored narrower: bf16 storage with fp32 compute on some CPUs)."""
        return self.compute_dtype or self.model.visual_generator.backbone.img_in.weight.dtype

    @property
    def vae(self) -> Any:
        """diffusers' AutoencoderKL over the loaded VAE weights: built (diffusers imported) on first use, so
        understanding never imports diffusers (`lite/model/deferred_vae.py`)."""
        return self.model.visual_generator.vae.autoencoder()

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
        deferred = self.model.visual_generator.vae  # not built yet: it records the tiling for when it is
        set_vae_tiling(deferred.autoencoder() if deferred.built else deferred, tile, overlap)
        self.vae_tile = tile

    def workload(self, task: str, width: int = 0, height: int = 0, nfe: int | None = None,
                 max_new_tokens: int = 1024, num_images: int = 1) -> Workload:
        return Workload(task, width=width or 1024, height=height or 1024, nfe=nfe, num_images=num_images,
                        max_new_tokens=max_new_tokens, device_type=self.device.type,
                        dtype_bytes=torch.finfo(self.dtype).bits // 8,
                        vae_dtype_bytes=torch.finfo(self.model.visual_generator.vae.dtype).bits // 8, vae_tile=self.vae_tile)

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

    # -- understanding --------------------------------------------------------------------------------

    def understand(self, images: list[Image.Image] | Image.Image | None, question: str, max_new_tokens: int = 1024,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, stream: bool = False,
                   history: list[Turn] | None = None, seed: int = 42) -> AnswerResult | AnswerStream:
        """Answer a question about zero or more images; greedy unless `do_sample`.

        As in the reference, `images` is the whole conversation's list: the images of the `history`
        turns (each turn says how many it had) first, then the current question's. Returns an
        `AnswerResult` (`str(result)` is the text), or with `stream` an `AnswerStream` to iterate.
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

        def pieces() -> Iterator[str]:  # the token source (`lite.runtime.understanding`)
            self._phase("conditions")
            yield from answer(self, prompt, imgs, sampling, max_new_tokens, stats, start)

        if stream:  # tokens already shown cannot be taken back, so a stream is not retried
            self.offload.prepare(wl)
            return AnswerStream(pieces(), stats, lambda done: self._finish(done, start))
        text = self.offload.run(wl, lambda: "".join(pieces()))
        return AnswerResult(text, self._finish(stats, start))

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
