"""The Starlette application: OpenAI-compatible routes, the job routes, metrics and the web page.

Handlers only parse, queue and wait: every model call runs on the queue's worker thread. A client
error is an `ApiError` (4xx, OpenAI-style body); anything else is a bug, logged with its traceback
on stderr and answered with a 500 JSON error, and the server goes on.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from lite.server.guard import BodyTooLarge, Guard, api_error, disconnected, http_error, user_error
from lite.server.jobs import Job, JobQueue, QueueFull, ShuttingDown
from lite.server.metrics import Metrics
from lite.server.openai_schema import (
    ApiError,
    Limits,
    decode_image_bytes,
    decode_image_url,
    parse_chat,
    parse_image_request,
)
from lite.server.tasks import chat_job, image_job

MODEL_ID = "Ovis-U1-3B"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServerSettings:
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    model_name: str = MODEL_ID
    device: str = "cpu"


class Server:
    """The resident pipeline, its queue and its counters: what every handler shares."""

    def __init__(self, pipe: Any, settings: ServerSettings) -> None:
        self.pipe = pipe
        self.settings = settings
        self.limits = settings.limits
        self.metrics = Metrics()
        self.queue = JobQueue(settings.limits.max_queue, on_finish=self._finished)
        self.started = time.time()

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


# ---------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------

def srv(request: Request) -> Server:
    return request.app.state.server


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        raise ApiError("the request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


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
    import torch

    from offload.errors import UserError

    from lite.errors import Cancelled

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


# ---------------------------------------------------------------------------------------------
# Page, health, models, metrics.
# ---------------------------------------------------------------------------------------------

async def page(request: Request) -> Response:
    html = resources.files("lite.server").joinpath("page.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


async def health(request: Request) -> Response:
    server = srv(request)
    status = 503 if server.queue.closed else 200
    body = {"status": "shutting_down" if status == 503 else "ok", "model": server.settings.model_name,
            "path": str(server.pipe.model_id), "preset": server.preset_name, "device": server.settings.device,
            "defaults": server.defaults(), "auth": server.settings.api_key is not None,
            "limits": vars(server.limits), "queue_length": len(server.queue)}
    hooks = getattr(server.pipe, "cpu_hooks", None)  # the CPU kernels this process runs (h1: surgical)
    body["cpu_plan"] = hooks.plan_dict() if hooks is not None else None
    return JSONResponse(body, status_code=status)


async def models(request: Request) -> Response:
    server = srv(request)
    return JSONResponse({"object": "list", "data": [_model(server)]})


async def model(request: Request) -> Response:
    server = srv(request)
    if request.path_params["model"] != server.settings.model_name:
        raise ApiError(f"model {request.path_params['model']!r} is not served here; this server serves "
                       f"{server.settings.model_name!r}", "model", status=404, code="model_not_found")
    return JSONResponse(_model(server))


def _model(server: Server) -> dict[str, Any]:
    return {"id": server.settings.model_name, "object": "model", "created": int(server.started),
            "owned_by": "AIDC-AI", "root": str(server.pipe.model_id), "preset": server.preset_name}


async def metrics(request: Request) -> Response:
    server = srv(request)
    running = server.queue.running
    snapshot = server.metrics.snapshot(queue_length=len(server.queue), running=running is not None,
                                       uptime=time.time() - server.started)
    wants_text = request.query_params.get("format") == "prometheus" or (
        "text/plain" in request.headers.get("accept", "") and "application/json" not in request.headers.get("accept", ""))
    if wants_text:
        return PlainTextResponse(server.metrics.prometheus(snapshot), media_type="text/plain; version=0.0.4")
    return JSONResponse(snapshot)


# ---------------------------------------------------------------------------------------------
# Chat.
# ---------------------------------------------------------------------------------------------

async def chat_completions(request: Request) -> Response:
    server = srv(request)
    req = parse_chat(await json_body(request), server.limits)
    job = Job("chat", chat_job(server.pipe, req, stream=req.stream),
              info={"max_tokens": req.max_tokens, "images": len(req.images), "turns": len(req.history) + 1})
    cid, created, name = "chatcmpl-" + job.id[4:], int(time.time()), server.settings.model_name
    if not req.stream:
        submit(server, job)
        result = await wait_for(request, server, job)
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                         "finish_reason": result["finish_reason"], "logprobs": None}],
            "usage": _usage(result), "ovis_lite": job_extension(job) | {"stats": result["stats"]}},
            headers={"X-Job-Id": job.id})
    events = job.subscribe()  # before submitting: no piece is missed
    try:
        submit(server, job)
    except ApiError:
        job.unsubscribe(events)
        raise

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    async def stream() -> AsyncIterator[str]:
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await events.get()
                kind = event["type"]
                if kind == "delta":
                    yield chunk({"content": event["content"]})
                elif kind == "done":
                    result = job.future.result()
                    yield chunk({}, result["finish_reason"])
                    if req.include_usage:
                        yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                                   "choices": [], "usage": _usage(result)})
                    yield "data: [DONE]\n\n"
                    job.release()
                    return
                elif kind in ("error", "cancelled"):
                    exc = job.future.exception()
                    try:
                        err = job_error(server, exc)
                    except BaseException:  # a real bug: log it, tell the client, keep serving
                        traceback.print_exception(exc, file=sys.stderr)
                        err = ApiError("internal server error (logged on the server)", status=500, type="server_error")
                    yield sse(err.body())
                    yield "data: [DONE]\n\n"
                    return
        finally:
            job.unsubscribe(events)
            if not job.future.done():
                server.queue.cancel(job, "the client disconnected")
                server.metrics.count("disconnects")

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS | {"X-Job-Id": job.id})


def _usage(result: dict[str, Any]) -> dict[str, int]:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}


# ---------------------------------------------------------------------------------------------
# Images.
# ---------------------------------------------------------------------------------------------

def _image_response(job: Job, result: dict[str, Any]) -> Response:
    return JSONResponse({"created": int(time.time()), "data": result["data"], "output_format": "png",
                         "ovis_lite": job_extension(job) | {"stats": result["stats"], "settings": result["settings"]}},
                        headers={"X-Job-Id": job.id})


def _job_info(req: Any) -> dict[str, Any]:
    return {"prompt": req.prompt, "size": f"{req.width}x{req.height}" if req.width else None, "n": req.n,
            "seed": req.seed, "steps": req.steps, "negative_prompt": req.negative_prompt}


async def image_generations(request: Request) -> Response:
    server = srv(request)
    req = parse_image_request(await json_body(request), server.limits, "t2i")
    job = submit(server, Job("t2i", image_job(server.pipe, req), info=_job_info(req)))
    return _image_response(job, await wait_for(request, server, job))


async def image_edits(request: Request) -> Response:
    server = srv(request)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError("images/edits takes multipart/form-data with an 'image' file and a 'prompt'")
    try:
        form = await request.form(max_files=4, max_fields=64, max_part_size=server.limits.max_body_bytes)
    except (ClientDisconnect, BodyTooLarge):
        raise
    except Exception as exc:  # noqa: BLE001 - python-multipart's parse errors
        raise ApiError(f"cannot parse the multipart form ({type(exc).__name__}: {exc})") from None
    upload = form.get("image") or form.get("image[]")
    if upload is None or isinstance(upload, str):
        raise ApiError("'image' is a required file field (multipart/form-data)", "image")
    image = decode_image_bytes(await upload.read(), server.limits, "image")
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    req = parse_image_request(fields, server.limits, "edit", image)
    job = submit(server, Job("edit", image_job(server.pipe, req), info=_job_info(req)))
    return _image_response(job, await wait_for(request, server, job))


# ---------------------------------------------------------------------------------------------
# Jobs: submit now, watch progress and previews over SSE, fetch the result.
# ---------------------------------------------------------------------------------------------

async def create_job(request: Request) -> Response:
    """POST /v1/jobs {"task": "generate"|"edit", ...the images/generations fields, "image": data URI}."""
    server = srv(request)
    body = await json_body(request)
    task = {"generate": "t2i", "t2i": "t2i", "edit": "edit"}.get(body.get("task"))
    if task is None:
        raise ApiError(f"task must be 'generate' or 'edit', got {body.get('task')!r}", "task")
    image = None
    if task == "edit":
        if body.get("image") is None:
            raise ApiError("an edit job needs 'image' as a data URI", "image")
        image = decode_image_url(body["image"], server.limits, "image")
    req = parse_image_request(body, server.limits, task, image)
    job = Job(task, image_job(server.pipe, req), keep_result=True, wants_preview=bool(body.get("preview", True)),
              info=_job_info(req))
    submit(server, job)
    return JSONResponse(job.status(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


def _get_job(request: Request) -> Job:
    job = srv(request).queue.get(request.path_params["job_id"])
    if job is None:
        raise ApiError(f"no job {request.path_params['job_id']!r} (finished jobs are kept for a while only)",
                       "job_id", status=404, code="job_not_found")
    return job


def _final(server: Server, job: Job) -> dict[str, Any]:
    if job.state == "done":
        return {"type": "done", "id": job.id, "result": job.future.result() if job.keep_result else None}
    exc = job.future.exception()
    try:
        err = job_error(server, exc)
    except BaseException:
        err = ApiError("internal server error (logged on the server)", status=500, type="server_error")
    return {"type": "cancelled" if job.state == "cancelled" else "error", "id": job.id, "message": err.message}


async def list_jobs(request: Request) -> Response:
    server = srv(request)
    return JSONResponse({"object": "list", "data": [j.status() for j in server.queue.snapshot()]})


async def get_job(request: Request) -> Response:
    server, job = srv(request), _get_job(request)
    body = job.status()
    if job.future.done():
        body["result"] = _final(server, job)
    return JSONResponse(body)


async def delete_job(request: Request) -> Response:
    server, job = srv(request), _get_job(request)
    if not job.future.done():
        server.queue.cancel(job)
    return JSONResponse(job.status())


async def job_events(request: Request) -> Response:
    server, job = srv(request), _get_job(request)
    events = job.subscribe()

    async def stream() -> AsyncIterator[str]:
        try:
            yield sse(job.status() | {"type": "status"}, "status")
            if job.future.done():
                final = _final(server, job)
                yield sse(final, final["type"])
                return
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=10)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if event["type"] in ("error", "cancelled"):
                    event = _final(server, job)
                yield sse(event, event["type"])
                if event["type"] in ("done", "error", "cancelled"):
                    return
        finally:
            job.unsubscribe(events)
            if not job.future.done() and not job.watched:
                server.queue.cancel(job, "the client stopped watching")
                server.metrics.count("disconnects")

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


def create_app(pipe: Any, settings: ServerSettings) -> Starlette:
    server = Server(pipe, settings)
    routes = [
        Route("/", page, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/images/generations", image_generations, methods=["POST"]),
        Route("/v1/images/edits", image_edits, methods=["POST"]),
        Route("/v1/jobs", create_job, methods=["POST"]),
        Route("/v1/jobs", list_jobs, methods=["GET"]),
        Route("/v1/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/v1/jobs/{job_id}", delete_job, methods=["DELETE"]),
        Route("/v1/jobs/{job_id}/events", job_events, methods=["GET"]),
    ]
    from offload.errors import UserError

    app = Starlette(routes=routes, exception_handlers={ApiError: api_error, UserError: user_error,
                                                       HTTPException: http_error, ClientDisconnect: disconnected})
    app.state.server = server
    app.add_middleware(Guard, server_ref=[server])
    return app
