"""What every handler shares: the resident pipeline, its queue and counters, and the job helpers
(submit, wait with cancel-on-disconnect, a failed job's error as the client sees it, SSE framing)."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch
from starlette.requests import ClientDisconnect, Request

from offload.errors import UserError

from lite.errors import Cancelled
from lite.server.errors import ApiError
from lite.server.jobs import Job, JobQueue, QueueFull, ShuttingDown
from lite.server.metrics import Metrics
from lite.server.openai_schema import Limits
from lite.server.trust import Trust

T = TypeVar("T")
PARSE_THREADS = 2
MODEL_ID = "Ovis-U1-3B"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServerSettings:
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    trust: Trust = field(default_factory=Trust)
    model_name: str = MODEL_ID
    device: str = "cpu"


class Server:
    """The resident pipeline, its queue and its counters: what every handler shares."""

    def __init__(self, pipe: Any, settings: ServerSettings) -> None:
        self.pipe = pipe
        self.settings = settings
        self.limits = settings.limits
        self.trust = settings.trust
        self.metrics = Metrics()
        self.queue = JobQueue(settings.limits.max_queue, on_finish=self._finished)
        self.started = time.time()
        # Parsing and image decoding run here, off the event loop, two at a time: a burst of large
        # requests waits its turn instead of decoding (and holding) all their images at once.
        self.parsers = ThreadPoolExecutor(max_workers=PARSE_THREADS, thread_name_prefix="ovis-lite-parse")

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a parser thread; the event loop goes on serving meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.parsers, fn, *args)

    def _finished(self, job: Job, result: Any) -> None:
        """The stats of the job's result (its client may already hold the result itself)."""
        self.metrics.job_finished(job.task, job.state, result.get("stats") if isinstance(result, dict) else None)

    @property
    def preset_name(self) -> str | None:
        return getattr(getattr(self.pipe, "preset", None), "name", None)

    def defaults(self) -> dict[str, Any]:
        """The preset's sampler, shown by the page and /health."""
        preset = getattr(self.pipe, "preset", None)
        if preset is None:
            return {"steps": 50, "solver": "euler", "spacing": "linear"}
        return {"steps": preset.steps, "solver": preset.solver, "spacing": preset.spacing}

def srv(request: Request) -> Server:
    return request.app.state.server

def submit(server: Server, job: Job) -> Job:
    try:
        return server.queue.submit(job)
    except QueueFull:
        raise ApiError(f"the queue is full ({server.limits.max_queue} jobs waiting); retry later",
                       status=429, type="rate_limit_error", code="queue_full") from None
    except ShuttingDown:
        raise ApiError("the server is shutting down", status=503, type="server_error", code="shutting_down") from None


def job_error(server: Server, exc: BaseException) -> ApiError:
    """A failed job's exception as the client sees it (real bugs are re-raised: a logged 500)."""
    if isinstance(exc, ShuttingDown) or (isinstance(exc, Cancelled) and server.queue.closed):
        return ApiError("the server is shutting down; the job was cancelled", status=503, type="server_error",
                        code="shutting_down")
    if isinstance(exc, Cancelled):
        return ApiError(f"the job was cancelled: {exc}", status=409, code="cancelled")
    if isinstance(exc, torch.OutOfMemoryError):
        return ApiError("out of device memory (after one retry with a smaller plan); choose a smaller size "
                        "or preset", status=503, type="server_error", code="out_of_memory")
    if isinstance(exc, UserError):
        return ApiError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    raise exc


async def wait_for(request: Request, server: Server, job: Job) -> Any:
    """The job's result; a client that goes away cancels its job (queued: dropped; running: next step)."""
    fut = asyncio.wrap_future(job.future)
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    while True:
        done, _ = await asyncio.wait({fut}, timeout=0.25)
        if done:
            break
        if await request.is_disconnected():
            server.queue.cancel(job, "the client disconnected")
            server.metrics.count("disconnects")
            raise ClientDisconnect()
    if fut.exception() is not None:
        raise job_error(server, fut.exception())
    result = fut.result()
    job.release()
    return result


def job_extension(job: Job) -> dict[str, Any]:
    """Non-OpenAI fields under one key: which job, its place in the queue and its timings."""
    return {"job": job.id, "seq": job.seq, "queued_at": job.created, "started_at": job.started,
            "finished_at": job.finished}


def sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n"


def job_info(req: Any) -> dict[str, Any]:
    return {"prompt": req.prompt, "size": f"{req.width}x{req.height}" if req.width else None, "n": req.n,
            "seed": req.seed, "steps": req.steps, "negative_prompt": req.negative_prompt}
