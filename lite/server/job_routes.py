"""The job routes: submit now (202), then watch progress and previews over SSE, fetch or cancel.

Only the job's creator can cancel it by going away: the creation answer carries `owner_token`, and
an /events stream opened with `?owner=TOKEN` cancels the job when it closes. Any other watcher can
come and go freely; an explicit DELETE cancels for anyone who may use the API.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from lite.server.bodies import json_body
from lite.server.errors import ApiError
from lite.server.images_in import decode_image_bytes, url_bytes
from lite.server.jobs import Job
from lite.server.openai_schema import parse_image_request
from lite.server.state import SSE_HEADERS, Server, job_error, job_info, srv, sse, submit
from lite.server.tasks import image_job
from lite.validation import shown

TASKS = {"generate": "t2i", "t2i": "t2i", "edit": "edit"}


async def create_job(request: Request) -> Response:
    """POST /v1/jobs {"task": "generate"|"edit", ...the images/generations fields, "image": data URI}."""
    server = srv(request)
    body = await json_body(request)
    task = TASKS.get(body["task"]) if isinstance(body.get("task"), str) else None
    if task is None:
        raise ApiError(f"task must be 'generate' or 'edit', got {shown(body.get('task'))}", "task")
    image = None
    if task == "edit":
        if body.get("image") is None:
            raise ApiError("an edit job needs 'image' as a data URI", "image")
        data = url_bytes(body["image"], "image")
        image = await server.off_loop(decode_image_bytes, data, server.limits.max_image_pixels, "image")
    preview = body.get("preview", True)
    if not isinstance(preview, bool):
        raise ApiError("preview must be true or false", "preview")
    req = parse_image_request(body, server.limits, task, image)
    job = Job(task, image_job(server.pipe, req), keep_result=True, wants_preview=preview, info=job_info(req))
    submit(server, job)
    return JSONResponse(job.status() | {"owner_token": job.owner_token}, status_code=202,
                        headers={"Location": f"/v1/jobs/{job.id}"})


def _get_job(request: Request) -> Job:
    job = srv(request).queue.get(request.path_params["job_id"])
    if job is None:
        raise ApiError(f"no job {shown(request.path_params['job_id'])} (finished jobs are kept for a while only)",
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
    owner = job.owned_by(request.query_params.get("owner"))
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
            if owner and not job.future.done():  # the creator went away; a mere watcher cancels nothing
                server.queue.cancel(job, "its creator stopped watching")
                server.metrics.count("disconnects")

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)
