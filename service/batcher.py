"""Dynamic batching: one bounded queue and one worker per model, as Triton's dynamic batcher does.

The worker takes the oldest request and gathers more until the batch holds max_batch_size requests or
the oldest has waited max_queue_delay; it then runs the batch on the model's own thread (the event loop
keeps serving meanwhile) and answers each request with its own row of the result.

- A full queue refuses at once (QueueFullError, HTTP 429 with Retry-After) instead of growing latency.
  Requests still being read and decoded hold a place too (`admit`), so the service refuses before it
  spends anything on an upload it could not queue.
- A request whose deadline would pass before its batch could finish (the median of the last five batches
  says when) is answered 504 when the batch is formed, never computed late; one whose client went away
  (its future cancelled) is skipped the same way. Under overload the backend computes only answerable work.
  A request that even fresh could not be answered by that estimate is still tried: batches slower than
  the timeout must not lock the model out for good, nor keep the estimate from learning that it recovered.
- A backend failure fails that batch's requests only; the worker keeps running, and reports every batch's
  outcome (`on_batch`) so that the registry can tell a model whose backend keeps failing.
- A worker that dies of a bug fails the requests it held at once, and a new one takes the queue.
- close() stops intake and lets the worker finish everything already queued (graceful shutdown).
- The categories of a multi-category bundle share one batcher (and one backend): each request carries its
  category index, and a batch may mix them (the graph takes one index per image).
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from opentelemetry.trace import INVALID_SPAN_CONTEXT, SpanContext

from .metrics import ServiceMetrics
from .tracing import current_span_context, record_batch

log = logging.getLogger("diffad.service")

# images [B, C, H, W] (and, with categories, their indices [B]) -> (maps, scores)
RunBatch = Callable[..., tuple[np.ndarray, np.ndarray]]


class QueueFullError(RuntimeError):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the queue is full; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class RequestTimeoutError(RuntimeError):
    """The request outlived its deadline before its batch ran (or while it ran)."""


class InferenceError(RuntimeError):
    """The backend raised on the batch that held this request."""


class UpstreamError(RuntimeError):
    """A remote backend (Triton) refused the batch or could not be reached: each request in it is answered
    with `status` (429, 503 or 504) rather than a 500. backend_ok=False counts the batch as a failure, so
    that a Triton that went away turns the model unready."""

    def __init__(self, status: int, detail: str, retry_after_s: int | None = None, backend_ok: bool = True):
        super().__init__(detail)
        self.status, self.detail, self.retry_after_s, self.backend_ok = status, detail, retry_after_s, backend_ok


class BatcherClosedError(RuntimeError):
    """The batcher takes no new requests: the service is shutting down."""


@dataclass(frozen=True)
class InferenceResult:
    anomaly_map: np.ndarray   # float32 [1, H, W] at the model's resolution
    score: float              # the raw image score
    queue_s: float            # enqueued -> its batch started
    inference_s: float        # the whole batch's backend time
    batch_size: int


@dataclass(eq=False)
class _Pending:
    image: np.ndarray
    future: asyncio.Future
    enqueued_at: float
    deadline: float
    span_context: SpanContext = INVALID_SPAN_CONTEXT  # the request's span, when traced
    enqueued_ns: int = 0  # wall clock, for the queue-wait span
    category: int | None = None  # the image's category index, for a multi-category bundle's shared graph


_STOP = object()


async def wait_for_result(future: asyncio.Future, deadline: float) -> InferenceResult:
    """A queued image's result, or RequestTimeoutError at deadline (time.monotonic()). On timeout, or the
    caller's cancellation, the future is cancelled: the worker skips the image."""
    try:
        return await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise RequestTimeoutError("the request outlived its timeout") from None


def _fail(items: list[_Pending], error: Exception) -> None:
    """Answer with `error` every request of items not answered (or cancelled) already."""
    for item in items:
        if not item.future.done():
            item.future.set_exception(error)


class Admission:
    """A place held in a model's queue for a request being read and decoded; given back once the request
    is queued (or fails first). Releasing twice is harmless."""

    def __init__(self, batcher: DynamicBatcher):
        self._batcher: DynamicBatcher | None = batcher

    def release(self) -> None:
        if self._batcher is not None:
            self._batcher._admitted -= 1
            self._batcher = None


class DynamicBatcher:
    def __init__(self, model: str, run_batch: RunBatch, executor: Executor, max_batch_size: int,
                 max_queue_delay_s: float, max_queue_size: int, metrics: ServiceMetrics | None = None,
                 on_batch: Callable[[bool], None] | None = None):
        if max_batch_size < 1 or max_queue_size < 1 or max_queue_delay_s < 0:
            raise ValueError("need max_batch_size >= 1, max_queue_size >= 1 and max_queue_delay_s >= 0")
        self.model = model
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.metrics = metrics
        self.on_batch = on_batch
        self.worker_restarts = 0
        self._held: list[_Pending] = []  # the batch being formed or run: failed at once if the worker dies
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=max_queue_size)
        self._worker: asyncio.Task | None = None
        self._accepting = False
        self._seconds_per_batch = 0.0  # moving average, for Retry-After
        self._recent_batch_s: deque[float] = deque(maxlen=5)  # their median: what a batch takes
        self._forming = 0  # requests taken off the queue into the batch being formed
        self._admitted = 0  # requests admitted, still being read or decoded
        if metrics is not None:
            metrics.queue_depth.labels(model).set_function(lambda: self.depth)
            metrics.decoding.labels(model).set_function(lambda: self.decoding)

    @property
    def depth(self) -> int:
        """Requests waiting: admitted and being decoded, in the queue, or in a batch that is still filling."""
        return self._admitted + self._queue.qsize() + self._forming

    @property
    def decoding(self) -> int:
        return self._admitted

    def admit(self) -> Admission:
        """Hold a place for a request about to be read and decoded: QueueFullError when every place is taken
        (by queued requests and by others being decoded), BatcherClosedError when closed."""
        if not self._accepting:
            raise BatcherClosedError(f"model {self.model} is not taking requests")
        if self.depth >= self.max_queue_size:
            raise QueueFullError(self.retry_after_s())
        self._admitted += 1
        return Admission(self)

    def start(self) -> None:
        self._accepting = True
        self._start_worker()

    def _start_worker(self) -> None:
        self._worker = asyncio.create_task(self._work(), name=f"diffad-batcher-{self.model}")
        self._worker.add_done_callback(self._worker_ended)

    def _worker_ended(self, worker: asyncio.Task) -> None:
        if worker.cancelled() or worker.exception() is None:
            return
        log.error("model %s: the batcher's worker died; failing the %d request(s) it held and starting a new one",
                  self.model, len(self._held), exc_info=worker.exception())
        _fail(self._held, InferenceError("internal error while batching"))
        self._held, self._forming = [], 0
        if self._accepting:
            self.worker_restarts += 1
            self._start_worker()

    def submit(self, image: np.ndarray, deadline: float, admission: Admission | None = None,
               category: int | None = None) -> asyncio.Future:
        """Queue one image (uint8 C x H x W) now, in the caller's step of the event loop, and return the
        future of its result (await it with `wait_for_result`; cancel it to have the batcher skip the image).
        An admission's place becomes the queued request's. category: the image's index into a
        multi-category bundle's categories (the batcher then runs batches with their indices)."""
        if admission is not None:
            admission.release()
        if not self._accepting:
            raise BatcherClosedError(f"model {self.model} is not taking requests")
        now = time.monotonic()
        if now >= deadline:
            raise RequestTimeoutError("the request timed out before it was queued")
        pending = _Pending(image, asyncio.get_running_loop().create_future(), now, deadline,
                           current_span_context(), time.time_ns(), category)
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise QueueFullError(self.retry_after_s()) from None
        return pending.future

    def retry_after_s(self) -> int:
        """Whole seconds until the queue has likely drained by a batch's worth (at least 1)."""
        batches = math.ceil(self.depth / self.max_batch_size)
        return max(1, min(60, math.ceil(batches * self._seconds_per_batch)))

    async def close(self, timeout_s: float | None = None) -> None:
        """Take no new requests, answer those queued, then stop the worker."""
        self._accepting = False
        if self._worker is None:
            return
        if not self._worker.done():
            await self._queue.put(_STOP)  # FIFO: everything queued before it is answered first
        try:
            await asyncio.wait_for(asyncio.shield(self._worker), timeout_s)
        except asyncio.TimeoutError:
            log.warning("model %s: queue not drained in %.0f s; cancelling what is left", self.model, timeout_s)
            self._worker.cancel()
            error = BatcherClosedError("the service shut down before this request ran")
            _fail(self._held, error)  # the batch being formed or run is answered too, not left to its deadline
            self._fail_queued(error)

    # --- the worker --------------------------------------------------------------------------------
    async def _work(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            self._held = batch
            self._forming = 1
            batch_closes = first.enqueued_at + self.max_queue_delay_s
            while len(batch) < self.max_batch_size:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    wait = batch_closes - time.monotonic()
                    if wait <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), wait)
                    except asyncio.TimeoutError:
                        break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
                self._forming = len(batch)
            self._forming = 0
            try:
                await self._run(batch)
            except Exception:  # a bug here must not stop the model: fail this batch, keep serving
                log.exception("model %s: batch of %d failed outside the backend", self.model, len(batch))
                _fail(batch, InferenceError("internal error while batching"))
            self._held = []

    def _live(self, batch: list[_Pending]) -> list[_Pending]:
        """The requests still wanted: not cancelled by their client, and able to get their answer before
        their deadline if the batch takes as long as batches have lately."""
        now = time.monotonic()
        takes = statistics.median(self._recent_batch_s) if self._recent_batch_s else 0.0
        live = []
        for item in batch:
            if item.future.done():  # cancelled: the client went away or its wait timed out
                continue
            if item.deadline - now <= takes < item.deadline - item.enqueued_at or now >= item.deadline:
                item.future.set_exception(RequestTimeoutError("the request's deadline would pass before its "
                                                              "batch finished"))
                if self.metrics is not None:
                    self.metrics.deadline_dropped.labels(self.model).inc()
                continue
            live.append(item)
        return live

    async def _run(self, batch: list[_Pending]) -> None:
        live = self._live(batch)
        if not live:
            return
        started, started_ns = time.monotonic(), time.time_ns()
        images = [item.image for item in live]
        categories = None if live[0].category is None else [item.category for item in live]
        loop = asyncio.get_running_loop()
        try:
            maps, scores = await loop.run_in_executor(self.executor, self._call_backend, images, categories)
        except UpstreamError as e:
            log.warning("model %s: a batch of %d answered %d: %s", self.model, len(live), e.status, e.detail)
            _fail(live, e)
            self._report(e.backend_ok)
            return
        except Exception as e:
            log.exception("model %s: inference failed on a batch of %d", self.model, len(live))
            _fail(live, InferenceError(f"inference failed: {type(e).__name__}"))
            self._report(False)
            return
        self._report(True)
        elapsed = time.monotonic() - started
        record_batch(self.model, [(item.span_context, item.enqueued_ns) for item in live], started_ns,
                     time.time_ns())
        self._recent_batch_s.append(elapsed)
        self._seconds_per_batch = elapsed if not self._seconds_per_batch else (
            0.8 * self._seconds_per_batch + 0.2 * elapsed)
        if self.metrics is not None:
            self.metrics.inference_duration.labels(self.model).observe(elapsed)
            self.metrics.batch_size.labels(self.model).observe(len(live))
        for i, item in enumerate(live):
            queue_s = started - item.enqueued_at
            if self.metrics is not None:
                self.metrics.queue_duration.labels(self.model).observe(queue_s)
            if not item.future.done():
                item.future.set_result(InferenceResult(maps[i], float(scores[i]), queue_s, elapsed, len(live)))

    def _report(self, ok: bool) -> None:
        if self.on_batch is not None:
            try:
                self.on_batch(ok)
            except Exception:
                log.exception("model %s: the batch report failed", self.model)

    def _call_backend(self, images: list[np.ndarray],
                      categories: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        batch = np.stack(images)
        maps, scores = self.run_batch(batch) if categories is None else \
            self.run_batch(batch, np.asarray(categories, dtype=np.int64))
        if len(maps) != len(images) or len(scores) != len(images):
            raise RuntimeError(f"the backend answered {len(scores)} results for {len(images)} images")
        return maps, scores

    def _fail_queued(self, error: Exception) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if item is not _STOP and not item.future.done():
                item.future.set_exception(error)
