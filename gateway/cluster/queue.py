"""A cluster gateway's engine: the Redis queue (:class:`RedisEngineClient`).

It is an :class:`~engine.client.EngineClient` like the in-process one, so the gateway
core does not change: :meth:`submit` queues a request without waiting (requests of one
event-loop turn are enqueued together, in one round trip, by ``ENQUEUE``: global
backpressure, then an entry on the stream of the request's latent shape). Workers run
and complete the requests; :meth:`outputs` then says :class:`~engine.api.Finished`,
or an :class:`~engine.api.EngineError` for a request the cluster refused (queue full),
lost (Redis restarted empty) or could not reach for ``unavailable_after`` seconds.

When a worker is idle, ``ENQUEUE`` hands it the task in the same step (its inbox), so
at light load a task reaches an engine without waiting for a pull. The request's image
travels by reference (``image_uuid``: it is in the shared image
store already) and its ``context`` is what the worker needs to answer it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from engine import codecs
from engine.api import EngineError, ErrorCode, Finished, UpscaleRequest
from engine.client import QueuedOutputs

from . import keys
from .link import ClusterUnavailable, RedisLink, cancel_all
from .state import LOST, RedisState, task_statuses

__all__ = ["RedisEngineClient", "shape_name"]

logger = logging.getLogger(__name__)

RECONCILE_EVERY = 2.0  # seconds between checks of unfinished tasks' records


def shape_name(image: bytes) -> str:
    """The queue a request goes to: its padded latent shape ``HxW`` (``any`` when its
    header cannot be read: a worker's engine then says what is wrong with it)."""
    shape = codecs.latent_shape(image)
    return keys.ANY_SHAPE if shape is None else f"{shape[0]}x{shape[1]}"


class RedisEngineClient(QueuedOutputs):
    remote = True

    def __init__(
        self,
        link: RedisLink,
        state: RedisState,
        *,
        max_queued: int,
        unavailable_after: float,
        max_deliveries: int,
        images_in_redis: bool,
    ) -> None:
        """``max_deliveries`` and ``images_in_redis`` are for the tasks this gateway
        hands to an idle worker itself: it begins them as the worker's pull would."""
        super().__init__()
        self.link = link
        self.max_queued = max_queued  # 0: no global bound
        self.unavailable_after = unavailable_after
        self.max_deliveries = max_deliveries
        self.images_in_redis = images_in_redis
        self.image_prefix = keys.image("")[:-1] if images_in_redis else ""
        state.on_task_done = self._done
        state.queue = self  # it may enqueue in the same round trip as it registers (see admitted)
        self._buffer: list[UpscaleRequest] = []
        self._submitted = asyncio.Event()
        self._waiting: dict[str, float] = {}  # request id → when it was submitted
        self._flush: asyncio.Task | None = None
        self._reconciler: asyncio.Task | None = None
        self._down_since: float | None = None
        self._running = False

    async def start(self) -> None:
        self._running = True
        self._flush = asyncio.create_task(self._enqueue_loop(), name="queue-enqueue")
        self._reconciler = asyncio.create_task(self._reconcile(), name="queue-reconcile")

    @property
    def ready(self) -> bool:
        return self._running and self.link.healthy

    def submit(self, request: UpscaleRequest) -> None:
        self._waiting[request.request_id] = time.monotonic()
        self._buffer.append(request)
        self._submitted.set()

    def admitted(self, request: UpscaleRequest, answer: object) -> None:
        """``request`` was enqueued by the state with its registration (one round trip:
        :meth:`queue_enqueue` in its pipeline); ``answer`` is its ``ENQUEUE``'s. From
        here it is the same as a submitted request."""
        self._waiting[request.request_id] = time.monotonic()
        self._enqueued(request, answer)

    def queue_enqueue(self, pipe, request: UpscaleRequest, nonce: str = "") -> None:
        """Queue ``request``'s ``ENQUEUE`` on ``pipe``; with a ``nonce``, only if the
        ``REGISTER`` before it in the same pipeline (with that nonce) created its record."""
        shape = shape_name(request.image)
        rows = 2 if request.cfg_scale > 1 else 1
        args = [self.max_queued, shape, request.request_id, rows, request.context, keys.queue("")[:-1], "}"]
        args += [self.max_deliveries, self.image_prefix, keys.inbox("")[:-1]]
        args += [keys.alive("worker", ""), keys.WORK_CHANNEL, keys.task("")[:-1], nonce, request.image_uuid]
        task_keys = [keys.task(request.request_id), keys.SHAPES, keys.queue(shape), keys.IDLE]
        self.link.queue(pipe, "ENQUEUE", task_keys, args)

    async def _enqueue_loop(self) -> None:
        """One flush at a time, so tasks reach the queues in the order they were
        submitted (and the last ones are those refused when the queue is full)."""
        while True:
            await self._submitted.wait()
            await asyncio.sleep(0)  # let the rest of this loop turn's submissions gather
            self._submitted.clear()
            batch, self._buffer = self._buffer, []
            try:
                await self._enqueue(batch)
            except Exception:  # a bug here must not stop every later task
                logger.exception("enqueueing %d tasks failed", len(batch))
                for request in batch:
                    self._fail(request.request_id, ErrorCode.INTERNAL, "the task could not be queued")

    async def _enqueue(self, batch: list[UpscaleRequest]) -> None:
        """A batch of submissions, in one pipeline of ``ENQUEUE`` calls (each hands its
        task to an idle worker, or hints the workers)."""
        try:
            async with self.link.redis.pipeline(transaction=False) as pipe:
                for request in batch:
                    self.queue_enqueue(pipe, request)
                answers = await self.link.execute(pipe, raise_on_error=False)
        except ClusterUnavailable as exc:
            logger.warning("could not enqueue %d tasks: %s", len(batch), exc)
            for request in batch:
                self._fail(request.request_id, ErrorCode.UNAVAILABLE, "the cluster's queue (Redis) is unreachable")
            return
        for request, answer in zip(batch, answers):
            self._enqueued(request, answer)

    def _enqueued(self, request: UpscaleRequest, answer: object) -> None:
        """What an ``ENQUEUE``'s answer means for the request."""
        if isinstance(answer, Exception):
            logger.error("enqueueing %s failed: %s", request.request_id, answer)
            self._fail(request.request_id, ErrorCode.INTERNAL, "the task could not be queued")
        elif answer == b"full":
            message = f"the cluster's queue is full ({self.max_queued} tasks); try again shortly"
            self._fail(request.request_id, ErrorCode.OVERLOADED, message)
        elif answer == b"lost":
            self._fail(request.request_id, ErrorCode.LOST, LOST)

    def _fail(self, request_id: str, code: ErrorCode, message: str) -> None:
        if self._waiting.pop(request_id, None) is not None:
            self._outputs.put_nowait(EngineError(request_id, code, message))

    def _done(self, request_id: str) -> None:
        if self._waiting.pop(request_id, None) is not None:
            self._outputs.put_nowait(Finished(request_id))

    async def _reconcile(self) -> None:
        """Hints can be lost and Redis can restart empty: every few seconds, look at the
        records of what is still unfinished here."""
        while True:
            await asyncio.sleep(RECONCILE_EVERY)
            now = time.monotonic()
            due = [rid for rid, at in self._waiting.items() if now - at >= RECONCILE_EVERY]
            if not due:
                self._down_since = None
                continue
            try:
                statuses = await task_statuses(self.link, due)
            except ClusterUnavailable:
                self._down_since = self._down_since or now
                if now - self._down_since >= self.unavailable_after:
                    message = f"the cluster's queue (Redis) has been unreachable for {self.unavailable_after:g} s"
                    for request_id in due:
                        self._fail(request_id, ErrorCode.UNAVAILABLE, message)
                continue
            self._down_since = None
            for request_id, status in zip(due, statuses):
                if status is None:
                    self._fail(request_id, ErrorCode.LOST, LOST)
                elif status != b"processing":
                    self._done(request_id)

    async def abort(self, request_ids: Iterable[str]) -> None:
        """Queued work is not withdrawn: a worker runs it and the record keeps it."""
        return None

    async def close(self) -> None:
        self._running = False
        await cancel_all([task for task in (self._flush, self._reconciler) if task is not None])
        self._outputs.put_nowait(None)

