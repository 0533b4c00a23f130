"""What a job does on the worker thread: call the pipeline, report progress, encode the results.

Generated PNGs carry the CLI's metadata (the same fields `ovis-lite generate` writes), in the
same PNG text chunks as `lite.runtime.outputs.save_image`, so `ovis-lite info` reads them.
"""

from __future__ import annotations

import base64
from typing import Any, Callable

from PIL import Image

from lite.errors import Cancelled
from lite.model.processing import understanding_prompt
from lite.runtime import outputs
from lite.server.jobs import Job
from lite.server.openai_schema import ChatRequest, ImageRequest


def png_bytes(image: Image.Image, metadata: dict[str, Any] | None = None) -> bytes:
    """PNG bytes with the same text chunks the CLI writes (`lite.runtime.outputs.encode_image`)."""
    return outputs.encode_image(image, "PNG", metadata)[0]


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def run_stats(stats: Any) -> dict[str, Any]:
    """A result's `RunStats` as the API reports it (`RunStats.to_dict`: steps and NFE per image, as the CLI; for
    understanding, `cache`: prefix tokens reused and the caches' counts)."""
    out = stats.to_dict()
    for key in ("settings", "machine", "tokens"):
        out.pop(key, None)
    return out


def image_job(pipe: Any, req: ImageRequest) -> Callable[[Job], dict[str, Any]]:
    """generate or edit N images; the step callback reports progress (and previews) and honours cancel."""

    def run(job: Job) -> dict[str, Any]:
        state = {"image": 1, "last": 0}  # "image" counts from 1, as "step" does (the page's bar relies on it)

        def callback(step: int, total: int, latent: Any) -> bool | None:
            if job.cancelled:
                return False
            if step <= state["last"]:
                state["image"] += 1
            state["last"] = step
            extra: dict[str, Any] = {"image": state["image"], "images": req.n}
            if job.wants_preview and job.watched:
                extra["preview"] = data_uri(pipe.preview(latent))
            job.progress(step, total, **extra)
            return None

        kwargs: dict[str, Any] = dict(steps=req.steps, seed=req.seed, negative_prompt=req.negative_prompt,
                                      num_images=req.n, callback=callback)
        for name in ("txt_cfg", "solver", "spacing"):
            if getattr(req, name) is not None:
                kwargs[name] = getattr(req, name)
        if req.task == "t2i":
            result = pipe.generate(req.prompt, width=req.width, height=req.height, **kwargs)
        else:
            source = req.image
            if req.width is not None and (req.width, req.height) != source.size:
                source = source.resize((req.width, req.height), Image.Resampling.BICUBIC)
            if req.img_cfg is not None:
                kwargs["img_cfg"] = req.img_cfg
            result = pipe.edit(source, req.prompt, **kwargs)
        if job.cancelled or result.cancelled:
            raise Cancelled("cancelled by the client")
        data = []
        for i, image in enumerate(result.images):
            meta = result.metadata(i)
            if req.task == "edit":
                meta["source"] = "upload"
            data.append({"b64_json": base64.b64encode(png_bytes(image, meta)).decode(), "seed": result.seeds[i],
                         "revised_prompt": req.prompt})
        return {"data": data, "stats": run_stats(result.stats), "settings": dict(result.stats.settings)}

    return run


def chat_job(pipe: Any, req: ChatRequest, stream: bool) -> Callable[[Job], dict[str, Any]]:
    """Answer the conversation's last question; a streamed answer is sent piece by piece as `delta` events.

    A non-streamed answer goes through the pipeline's OOM retry; a streamed one can be cancelled mid-answer.
    """

    def run(job: Job) -> dict[str, Any]:
        kwargs = dict(max_new_tokens=req.max_tokens, do_sample=req.do_sample, temperature=req.temperature,
                      top_p=req.top_p, history=req.history or None, seed=req.seed)
        if stream:
            pieces = pipe.understand(req.images, req.question, stream=True, **kwargs)
            try:
                for piece in pieces:
                    if job.cancelled:
                        raise Cancelled("cancelled by the client")
                    if piece:
                        job.emit("delta", content=piece)
            finally:
                pieces.close()
            answer, stats = pieces.text, pieces.stats
        else:
            result = pipe.understand(req.images, req.question, **kwargs)
            answer, stats = result.text, result.stats
        tokens = stats.tokens or _count_tokens(pipe, answer)
        return {"text": answer, "completion_tokens": tokens, "prompt_tokens": _prompt_tokens(pipe, req),
                "finish_reason": "length" if tokens >= req.max_tokens else "stop", "stats": run_stats(stats)}

    return run


def _count_tokens(pipe: Any, text: str) -> int:
    try:
        return len(pipe.tokenizer.encode(text, add_special_tokens=False))
    except Exception:  # noqa: BLE001 - usage is informative only
        return 0


def _prompt_tokens(pipe: Any, req: ChatRequest) -> int:
    """Tokens of the template text (each image counted as its one placeholder, as before expansion)."""
    earlier = sum(t.num_images for t in req.history)
    return _count_tokens(pipe, understanding_prompt(req.question, len(req.images) - earlier, req.history or None))
