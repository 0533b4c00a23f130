"""One device, many clients: a bounded FIFO queue and one worker thread that runs one job at a time.

Handlers run on the event loop; the model runs on the worker thread. A job's events (queued,
position, started, progress, preview, delta, done, error, cancelled) are pushed to every subscribed
asyncio queue with `call_soon_threadsafe`, so a handler never blocks the loop and the worker never
waits for a slow client. Cancelling a running job sets a flag that the step callback (images) or the
token loop (chat) checks, so it stops at the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import sys
import threading
import time
import traceback
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from lite.errors import Cancelled

KEEP_FINISHED = 32  # finished jobs whose status stays readable
KEEP_RESULTS = 8  # finished /v1/jobs jobs whose images stay readable (memory stays bounded)


class QueueFull(Exception):
    """The queue holds its maximum number of jobs."""


class ShuttingDown(Exception):
    """The server is stopping: no new jobs, queued ones are dropped."""


@dataclass
class Job:
    task: str  # "chat", "t2i" or "edit"
    run: Callable[["Job"], Any]  # called on the worker thread
    id: str = field(default_factory=lambda: "job_" + secrets.token_hex(8))
    seq: int = 0
    state: str = "queued"  # queued, running, done, failed, cancelled
    position: int = 0  # jobs ahead of this one (0 = next, or running)
    step: int = 0
    total: int = 0
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    future: Future = field(default_factory=Future)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    keep_result: bool = False  # /v1/jobs results are kept for GET; OpenAI routes hand theirs back directly
    wants_preview: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # public settings shown by GET /v1/jobs/{id}
    # Handed to the creator only: the one whose closed /events stream (?owner=TOKEN) cancels the job.
    owner_token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    _listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    @property
    def watched(self) -> bool:
        return bool(self._listeners)

    def owned_by(self, token: str | None) -> bool:
        return token is not None and secrets.compare_digest(token.encode(), self.owner_token.encode())

    def status(self) -> dict[str, Any]:
        out = {"id": self.id, "object": "job", "task": self.task, "state": self.state, "position": self.position,
               "step": self.step, "total": self.total, "created": int(self.created), "settings": self.info}
        if self.started is not None:
            out["started_at"] = self.started
        if self.finished is not None:
            out["finished_at"] = self.finished
        return out

    def subscribe(self) -> asyncio.Queue:
        """An asyncio queue on the running loop that receives this job's events from now on."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._listeners.append((loop, q))
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        with self._lock:
            self._listeners = [(lp, lq) for lp, lq in self._listeners if lq is not q]

    def emit(self, event: str, **data: Any) -> None:
        payload = {"type": event, "id": self.id, **data}
        with self._lock:
            listeners = list(self._listeners)
        for loop, q in listeners:
            try:
                loop.call_soon_threadsafe(q.put_nowait, payload)
            except RuntimeError:  # that loop is closed: the client is gone
                pass

    def release(self) -> None:
        """Drop the result once it was handed to its client (finished jobs stay listed, without images)."""
        if not self.keep_result and self.future.done():
            self.future = Future()
            self.future.set_result(None)

    def progress(self, step: int, total: int, **extra: Any) -> None:
        self.step, self.total = step, total
        self.emit("progress", step=step, total=total, **extra)


class JobQueue:
    """A bounded FIFO of jobs and the one worker thread that runs them."""

    def __init__(self, max_queue: int, on_finish: Callable[[Job, Any], None] | None = None) -> None:
        self.max_queue = max_queue
        self.on_finish = on_finish or (lambda job, result: None)  # with the job's result (None unless done)
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._seq = itertools.count(1)
        self.running: Job | None = None
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.closed = False
        self._thread = threading.Thread(target=self._work, name="ovis-lite-worker", daemon=True)
        self._thread.start()

    # -- clients ---------------------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self.closed:
                raise ShuttingDown()
            if len(self._pending) >= self.max_queue:
                raise QueueFull()
            job.seq = next(self._seq)
            job.position = len(self._pending) + (1 if self.running is not None else 0)
            self._pending.append(job)
            self.jobs[job.id] = job
            self._trim()
            self._cond.notify()
        job.emit("queued", position=job.position)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self.jobs.get(job_id)

    def snapshot(self) -> list[Job]:
        """The known jobs, oldest first (queued, running and the last finished ones)."""
        with self._cond:
            return list(self.jobs.values())

    def __len__(self) -> int:
        with self._cond:
            return len(self._pending)

    def cancel(self, job: Job, reason: str = "cancelled by the client") -> None:
        """A queued job is dropped now; a running one stops at its next step."""
        job.cancel_event.set()
        with self._cond:
            queued = job in self._pending
            if queued:
                self._pending.remove(job)
        if queued:
            self._finish(job, "cancelled", error=Cancelled(reason))
            self._announce_positions()

    def close(self) -> None:
        """Stop taking jobs, drop the queued ones and cancel the running one (it stops at its next step)."""
        with self._cond:
            self.closed = True
            dropped = list(self._pending)
            self._pending.clear()
            running = self.running
            self._cond.notify_all()
        for job in dropped:
            job.cancel_event.set()
            self._finish(job, "cancelled", error=ShuttingDown())
        if running is not None:
            running.cancel_event.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    # -- the worker ------------------------------------------------------------------------------

    def _trim(self) -> None:
        finished = [j for j in self.jobs.values() if j.state in ("done", "failed", "cancelled")]
        for job in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self.jobs[job.id]
        kept = [j for j in finished if j.keep_result and j.state == "done"]
        for job in kept[:max(0, len(kept) - KEEP_RESULTS)]:
            job.keep_result = False
            job.release()
            job.info["result"] = "expired"

    def _announce_positions(self) -> None:
        with self._cond:
            waiting = list(self._pending)
            ahead = 1 if self.running is not None else 0
        for i, job in enumerate(waiting):
            if job.position != i + ahead:
                job.position = i + ahead
                job.emit("position", position=job.position)

    def _finish(self, job: Job, state: str, result: Any = None, error: BaseException | None = None) -> None:
        job.state, job.finished = state, time.time()
        if error is None:
            job.future.set_result(result)
            job.emit("done", result=result if job.keep_result else None)
        else:
            job.future.set_exception(error)
            job.emit("cancelled" if state == "cancelled" else "error", message=str(error) or type(error).__name__)
        try:
            self.on_finish(job, result)
        except Exception:  # noqa: BLE001 - bookkeeping must never stop the worker
            traceback.print_exc(file=sys.stderr)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self.closed:
                    self._cond.wait()
                if not self._pending:
                    return
                job = self._pending.popleft()
                self.running = job
            job.state, job.started, job.position = "running", time.time(), 0
            job.emit("started")
            self._announce_positions()
            try:
                if job.cancelled:
                    raise Cancelled("cancelled before it started")
                result = job.run(job)
            except Cancelled as exc:
                self._finish(job, "cancelled", error=ShuttingDown() if self.closed else exc)
            except BaseException as exc:  # noqa: BLE001 - reported to the client; the worker goes on
                self._finish(job, "failed", error=exc)
            else:
                self._finish(job, "done", result)
            finally:
                with self._cond:
                    self.running = None
                self._announce_positions()
