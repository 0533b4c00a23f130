"""The Starlette application: OpenAI-compatible routes, the job routes, metrics and the web page.

Handlers only parse, queue and wait: every model call runs on the queue's worker thread. A client
error is an `ApiError` (4xx, OpenAI-style body); anything else is a bug, logged with its traceback
on stderr and answered with a 500 JSON error, and the server goes on.
"""

from __future__ import annotations

import sys
import time
import traceback
from importlib import resources
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from offload.errors import UserError

from lite.server.bodies import edit_form, json_body
from lite.server.errors import ApiError
from lite.server.guard import Guard, api_error, disconnected, http_error, user_error
from lite.server.images_in import decode_image_bytes
from lite.server.job_routes import create_job, delete_job, get_job, job_events, list_jobs
from lite.server.jobs import Job
from lite.server.openai_schema import parse_chat, parse_image_request
from lite.server.state import (SSE_HEADERS, Server, ServerSettings, job_error, job_extension, job_info, srv, sse,
                               submit, wait_for)
from lite.server.tasks import chat_job, image_job

__all__ = ["ServerSettings", "create_app"]


# ---------------------------------------------------------------------------------------------
# Page, health, models, metrics.
# ---------------------------------------------------------------------------------------------

async def page(request: Request) -> Response:
    html = resources.files("lite.server").joinpath("page.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><circle cx="8" cy="8" r="7" '
           'fill="#2f6f4f"/><circle cx="8" cy="8" r="3" fill="#fff"/></svg>')


async def favicon(request: Request) -> Response:
    """The page's icon, so a browser's automatic /favicon.ico request is not a 404 in its console."""
    return Response(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})


async def health(request: Request) -> Response:
    server = srv(request)
    status = 503 if server.queue.closed else 200
    body = {"status": "shutting_down" if status == 503 else "ok", "model": server.settings.model_name,
            "path": str(server.pipe.model_id), "preset": server.preset_name, "device": server.settings.device,
            "defaults": server.defaults(), "auth": server.settings.api_key is not None,
            "limits": vars(server.limits), "queue_length": len(server.queue)}
    hooks = getattr(server.pipe, "cpu_hooks", None)  # the CPU kernels this process runs (h1: surgical)
    body["cpu_plan"] = hooks.plan_dict() if hooks is not None else None
    engine = getattr(server.pipe, "llm_engine", None)  # what answers chat: ours, or llama.cpp (--llm-engine)
    body["llm_engine"] = "torch" if engine is None else f"llama.cpp:{engine.gguf_format}"
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
    req = await server.off_loop(parse_chat, await json_body(request), server.limits)  # images decode off the loop
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


async def image_generations(request: Request) -> Response:
    server = srv(request)
    req = parse_image_request(await json_body(request), server.limits, "t2i")
    job = submit(server, Job("t2i", image_job(server.pipe, req), info=job_info(req)))
    return _image_response(job, await wait_for(request, server, job))


async def image_edits(request: Request) -> Response:
    """multipart/form-data: one `image` file, `prompt` and the generation fields; no `mask`."""
    server = srv(request)
    fields, data = await edit_form(request, server.limits.max_body_bytes)
    parse_image_request(fields, server.limits, "edit")  # the fields are checked before the image is decoded
    image = await server.off_loop(decode_image_bytes, data, server.limits.max_image_pixels, "image")
    req = parse_image_request(fields, server.limits, "edit", image)
    job = submit(server, Job("edit", image_job(server.pipe, req), info=job_info(req)))
    return _image_response(job, await wait_for(request, server, job))


def create_app(pipe: Any, settings: ServerSettings) -> Starlette:
    server = Server(pipe, settings)
    routes = [
        Route("/", page, methods=["GET"]),
        Route("/favicon.ico", favicon, methods=["GET"]),
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
    app = Starlette(routes=routes, exception_handlers={ApiError: api_error, UserError: user_error,
                                                       HTTPException: http_error, ClientDisconnect: disconnected})
    app.state.server = server
    app.add_middleware(Guard, server_ref=[server])
    return app