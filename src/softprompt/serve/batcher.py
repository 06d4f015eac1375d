"""The dynamic batcher: concurrent requests, whatever their prompts, coalesced into one forward.

Requests arrive on the event loop; one worker thread owns the model. The worker takes the oldest
job, then keeps taking jobs of the same kind until the batch holds `max_batch` rows or the oldest
job has waited `max_wait_s`, and runs them as one call of the engine (a mixed-prompt forward).
Results go back to the event loop through `call_soon_threadsafe`, so the loop never blocks on
the model. The number of jobs in the system (queued or running) is capped: past `max_queue` a
submit raises `QueueFull` at once (the app answers 503 with Retry-After) instead of queueing
without bound.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class QueueFull(RuntimeError):
    """The server holds `max_queue` jobs already; the client should retry after a moment."""


@dataclass
class Job:
    kind: str  # jobs of one kind share a batch: "score" or "complete"
    payload: object
    rows: int  # forward rows this job adds to a batch
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


# (kind, payloads) -> one result per payload, in order; raising fails every job of the batch.
RunBatch = Callable[[str, list], list]
# (rows in the batch, seconds each job waited before its batch started)
ObserveBatch = Callable[[int, list[float]], None]


class Batcher:
    """Coalesces jobs into batches of at most `max_batch` rows, run by one worker thread."""

    def __init__(
        self, run_batch: RunBatch, max_batch: int, max_wait_s: float, max_queue: int, observe: ObserveBatch | None = None
    ) -> None:
        self.run_batch, self.max_batch, self.max_wait_s, self.max_queue = run_batch, max_batch, max_wait_s, max_queue
        self.observe = observe or (lambda rows, waits: None)
        self.pending = 0  # jobs submitted and not yet answered; touched on the event loop only
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._carry: Job | None = None  # a job taken that did not fit the last batch
        self._thread = threading.Thread(target=self._work, name="softprompt-model", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def submit(self, kind: str, payload: object, rows: int) -> object:
        """Queue a job and wait for its result (raised if the batch failed).

        Raises:
            QueueFull: `max_queue` jobs are in the system already.
        """
        if self.pending >= self.max_queue:
            raise QueueFull(f"the server is at its queue limit ({self.max_queue} requests in flight); retry shortly")
        self.pending += 1
        job = Job(kind, payload, max(1, rows), self._loop.create_future())
        self._queue.put(job)
        try:
            return await asyncio.shield(job.future)  # a client that goes away does not cancel a batch
        finally:
            if not job.future.done():  # cancelled while waiting: the answer is dropped when it comes
                job.future.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def drain(self) -> None:
        """Answer every job already submitted, then stop the worker."""
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    def _next_batch(self) -> list[Job] | None:
        first = self._carry or self._queue.get()
        self._carry = None
        if first is None:
            return None
        batch, rows = [first], first.rows
        deadline = first.enqueued + self.max_wait_s
        while rows < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if job is None or job.kind != first.kind or rows + job.rows > self.max_batch:
                self._carry = job  # the stop sentinel too: this batch runs first
                break
            batch.append(job)
            rows += job.rows
        return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            started = time.perf_counter()
            self.observe(sum(job.rows for job in batch), [started - job.enqueued for job in batch])
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        try:
            results = self.run_batch(batch[0].kind, [job.payload for job in batch])
            outcomes = [(result, None) for result in results]
        except Exception as error:  # noqa: BLE001 - a failed batch must not kill the worker
            if len(batch) > 1:  # run each job alone, so that only the one at fault fails
                for job in batch:
                    self._run([job])
                return
            outcomes = [(None, error)]
        for job, (result, error) in zip(batch, outcomes):
            self._loop.call_soon_threadsafe(self._resolve, job.future, result, error)

    def _resolve(self, future: asyncio.Future, result: object, error: Exception | None) -> None:
        self.pending -= 1
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
