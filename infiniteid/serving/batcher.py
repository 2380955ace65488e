"""``MicroBatcher``: a bounded queue that turns concurrent requests into batches.

* Admission (:meth:`MicroBatcher.admit`) happens before any work on a request: at
  most ``queue`` requests are admitted and not yet running; the next one is
  refused (:class:`QueueFull`, answered 429 with ``Retry-After``).
* Requests whose batch keys match (resolution, steps, scheduler, switches,
  identity-token count) join one batch, oldest first, up to ``max_batch``; the
  oldest waits at most ``window`` seconds for company, and only while other
  admitted requests are still on their way (a lone request starts at once, so
  batching costs nothing at concurrency 1).
* One batch at a time runs on the backend, in one worker thread; the event loop
  keeps accepting, decoding and encoding faces meanwhile.
* A request whose caller gave up (timeout: its future is cancelled) is dropped
  when its batch is formed, never run. A failing batch fails only its own requests.
* :meth:`drain` stops admission, lets the queue run empty and answers whatever is
  left when its time is up.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, List, Optional

import numpy as np

from .engine import Prepared, ServingEngine
from .forms import RequestError
from .metrics import ServerMetrics

log = logging.getLogger("infiniteid.serving")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy (queue full); retry in {retry_after} s")
        self.retry_after = retry_after


class Ticket:
    """One admitted request's place in the queue; released once (when its batch starts or it ends)."""

    def __init__(self, batcher: "MicroBatcher"):
        self._batcher = batcher
        self.admitted = time.perf_counter()
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._batcher._admitted -= 1
            self._batcher.metrics.queue_depth.set(self._batcher._admitted)
            self._batcher._wakeup.set()


@dataclass(eq=False)
class Result:
    array: np.ndarray
    timings: dict
    batch_id: int
    batch_size: int


@dataclass(eq=False)
class Job:
    item: Prepared
    ticket: Ticket
    future: "asyncio.Future[Result]"
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(self, engine: ServingEngine, metrics: ServerMetrics, queue: int, window_s: float):
        self.engine = engine
        self.metrics = metrics
        self.queue = queue
        self.window_s = window_s
        self.max_batch = engine.max_batch
        self._admitted = 0
        self._pending: List[Job] = []
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="infiniteid-batch")
        self._accepting = True
        self._batch_ids = itertools.count(1)
        self._batch_seconds: Optional[float] = None
        self._task: Optional[asyncio.Task] = None

    # -- admission -------------------------------------------------------------------
    def admit(self) -> Ticket:
        if not self._accepting:
            raise RequestError(503, "the server is shutting down and takes no new requests")
        if self._admitted >= self.queue:
            raise QueueFull(self.retry_after())
        self._admitted += 1
        self.metrics.queue_depth.set(self._admitted)
        return Ticket(self)

    def retry_after(self) -> int:
        """Seconds until the queue has room, from the measured batch time (1 s until one ran)."""
        per_batch = self._batch_seconds or 1.0
        return max(1, math.ceil(per_batch * math.ceil(self._admitted / max(self.max_batch, 1))))

    def submit(self, item: Prepared, ticket: Ticket) -> "asyncio.Future[Result]":
        if self._task is None or self._task.done():
            raise RequestError(503, "the server is shutting down and takes no new requests")
        job = Job(item, ticket, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._wakeup.set()
        return job.future

    # -- the worker --------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="infiniteid-batcher")
        self._task.add_done_callback(self._stopped)

    def _stopped(self, task: "asyncio.Task") -> None:
        """The worker only ends by draining; if it died of a bug, nothing queued may hang."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("the batch worker failed: %r", task.exception())
        self._accepting = False
        for j in self._pending:
            if not j.future.done():
                j.future.set_exception(RequestError(500, "the server's batch worker failed; see its log"))

    def _live(self) -> None:
        for j in [j for j in self._pending if j.future.done()]:  # callers that timed out: dropped
            self._pending.remove(j)
            j.ticket.release()

    async def _run(self) -> None:
        while True:
            self._live()
            if not self._pending:
                if not self._accepting and self._admitted == 0:
                    return  # drained: nothing queued, nothing admitted still on its way
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first = self._pending[0]
            until = first.enqueued + self.window_s
            while self._accepting:
                same = sum(1 for j in self._pending if j.item.key == first.item.key and not j.future.done())
                left = until - time.perf_counter()
                on_their_way = self._admitted - len(self._pending)  # admitted, still decoding or encoding faces
                if same >= self.max_batch or left <= 0 or on_their_way <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except asyncio.TimeoutError:
                    break
            self._live()
            if not self._pending:
                continue
            key = self._pending[0].item.key
            batch = [j for j in self._pending if j.item.key == key][: self.max_batch]
            for j in batch:
                self._pending.remove(j)
                j.ticket.release()
                self.metrics.queue_wait.observe(time.perf_counter() - j.ticket.admitted)
            await self._run_batch(batch)

    async def _run_batch(self, batch: List[Job]) -> None:
        batch_id = next(self._batch_ids)
        self.metrics.batch_size.observe(len(batch))
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(self._executor, self.engine.run_batch, [j.item for j in batch])
        except Exception as e:  # the backend failed: this batch's requests fail, the server goes on
            self.metrics.batches.labels("error").inc()
            log.error("batch %d (%d requests) failed: %s: %s", batch_id, len(batch), type(e).__name__, e)
            err = RequestError(500, f"the backend failed on this request's batch: {type(e).__name__}: {e}")
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(err)
            return
        seconds = time.perf_counter() - t0
        self._batch_seconds = seconds if self._batch_seconds is None else 0.8 * self._batch_seconds + 0.2 * seconds
        self.metrics.batches.labels("ok").inc()
        timings = {k: round(v, 4) for k, v in out.timings.items()}
        for j, arr in zip(batch, out.arrays):
            if not j.future.done():
                j.future.set_result(Result(arr, timings, batch_id, len(batch)))

    # -- shutdown --------------------------------------------------------------------
    async def drain(self, timeout: float) -> int:
        """Stop admitting, run what is queued (for at most ``timeout`` s), answer the rest 503.
        Returns how many were answered 503."""
        self._accepting = False
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                self._task.cancel()
        left = 0
        for j in self._pending:
            if not j.future.done():
                j.future.set_exception(RequestError(503, "the server shut down before this request ran"))
                left += 1
            j.ticket.release()
        self._pending.clear()
        self._executor.shutdown(wait=False)
        return left

    @property
    def depth(self) -> int:
        return self._admitted

    def stats(self) -> Any:
        return {"admitted": self._admitted, "pending": len(self._pending), "batch_seconds": self._batch_seconds}
