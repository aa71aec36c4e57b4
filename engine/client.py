"""The one small async interface the gateway uses to talk to an engine.

Like vLLM's ``EngineCoreClient``: the gateway calls :meth:`EngineClient.submit` (which
only queues, so it is a plain call: admitting a task costs no event-loop turn) and
:meth:`EngineClient.abort`, and reads every :class:`~engine.api.EngineOutput` from the
single async iterator :meth:`EngineClient.outputs`. Only the plain dataclasses of
``engine.api`` cross it, so an implementation may run the engine in this process
(:class:`InprocEngineClient`), in another one, or answer without a model at all
(:class:`NullEngineClient`, for protocol tests and overhead benchmarks only).

Contract, for every implementation:

- each submitted ``request_id`` gets zero or more ``Progress`` items (only when it asked)
  and then exactly one terminal ``UpscaleResult`` or ``EngineError``;
- :meth:`abort` ends a request with ``EngineError(code=ABORTED)`` unless it already ended;
- :meth:`submit` raises :class:`EngineOverloaded` when the queue is full and
  :class:`EngineUnavailable` when the engine is not running; neither consumes the id;
- nothing here blocks the event loop.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Iterable

from .api import EngineError, EngineOutput, ErrorCode, Progress, UpscaleRequest, UpscaleResult
from .stats import EngineStats, Observers

__all__ = [
    "EngineClient",
    "EngineOverloaded",
    "EngineUnavailable",
    "InprocEngineClient",
    "NullEngineClient",
    "QueuedOutputs",
]

logger = logging.getLogger(__name__)


class EngineOverloaded(Exception):
    """The engine's queue is full; try again later (``rateLimitExceeded``)."""


class EngineUnavailable(Exception):
    """The engine is not running (not started, stopped, or its loop died)."""


class EngineClient(abc.ABC):
    """Async handle on an engine. Start it, submit requests, read :meth:`outputs`."""

    #: True for an engine whose requests run, and are completed, in other processes (a
    #: cluster's queue): its requests carry ``image_uuid`` and ``context``, and it answers
    #: each with :class:`~engine.api.Finished` (or an ``EngineError``).
    remote: bool = False

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model and start the engine; returns once it can take requests."""

    @abc.abstractmethod
    def submit(self, request: UpscaleRequest) -> None:
        """Queue ``request`` without blocking. Its outputs arrive on :meth:`outputs`."""

    @abc.abstractmethod
    async def abort(self, request_ids: Iterable[str]) -> None:
        """Cancel requests; each still unfinished ends with an ``ABORTED`` error."""

    @abc.abstractmethod
    def outputs(self) -> AsyncIterator[EngineOutput]:
        """All outputs of all requests, in the order they happen. Iterate it once."""

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """True while the engine takes and runs requests (``/readyz``)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop the engine. Unfinished requests end with ``ABORTED`` errors."""

    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters and of the requests it holds now."""
        return EngineStats()


class QueuedOutputs(EngineClient, abc.ABC):
    """Shared plumbing for implementations: outputs go through one asyncio queue on
    the gateway's loop (``self._outputs``; ``None`` ends :meth:`outputs`)."""

    def __init__(self) -> None:
        self._outputs: asyncio.Queue[EngineOutput | None] = asyncio.Queue()

    async def outputs(self) -> AsyncIterator[EngineOutput]:  # type: ignore[override]
        while True:
            item = await self._outputs.get()
            if item is None:
                return
            yield item


class NullEngineClient(QueuedOutputs):
    """Answers every request at once without a model, by a plain 2x nearest resize.

    For protocol-only tests and gateway-overhead benchmarks. Never the server's default.
    """

    def __init__(self, max_queue: int = 1_000_000) -> None:
        super().__init__()
        self._running = False
        self._max_queue = max_queue
        self._pending: set[str] = set()
        # Repeated inputs (benchmarks send the same image) are answered from a small cache.
        self._cache: dict[tuple, tuple[bytes, int, int]] = {}
        self._stats = EngineStats()

    def stats(self) -> EngineStats:
        return self._stats.copy()

    async def start(self) -> None:
        self._running = True

    @property
    def ready(self) -> bool:
        return self._running

    def submit(self, request: UpscaleRequest) -> None:
        if not self._running:
            raise EngineUnavailable("engine is not running")
        if len(self._pending) >= self._max_queue:
            raise EngineOverloaded(f"engine queue is full ({self._max_queue} requests)")
        self._pending.add(request.request_id)
        self._finish(request)

    def _finish(self, request: UpscaleRequest) -> None:
        from . import codecs  # Pillow only; imported lazily to keep startup light

        started = time.perf_counter()
        self._pending.discard(request.request_id)
        key = (hash(request.image), len(request.image), request.output_format, request.output_quality)
        try:
            data, width, height = self._cache.get(key) or self._upscale(request)
        except codecs.ImageError as exc:
            self._stats.failed += 1
            self._outputs.put_nowait(EngineError(request.request_id, exc.code, str(exc)))
            return
        self._stats.succeeded += 1
        if len(self._cache) >= 64:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = (data, width, height)
        if request.want_progress or request.want_denoised:
            self._outputs.put_nowait(Progress(request.request_id, request.steps, request.steps))
        self._outputs.put_nowait(
            UpscaleResult(
                request_id=request.request_id,
                image=data,
                output_format=request.output_format,
                width=width,
                height=height,
                seed=request.seed,
                engine_seconds=time.perf_counter() - started,
            )
        )

    @staticmethod
    def _upscale(request: UpscaleRequest) -> tuple[bytes, int, int]:
        from . import codecs

        upscaled = codecs.resize_nearest_2x(codecs.decode_image(request.image))
        return (
            codecs.encode_image(upscaled, request.output_format, request.output_quality),
            upscaled.width,
            upscaled.height,
        )

    async def abort(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            if request_id in self._pending:
                self._pending.discard(request_id)
                self._stats.failed += 1
                self._outputs.put_nowait(EngineError(request_id, ErrorCode.ABORTED, "task was cancelled"))

    async def close(self) -> None:
        self._running = False
        self._outputs.put_nowait(None)


class InprocEngineClient(QueuedOutputs):
    """Runs :class:`engine.core.EngineCore` on a dedicated thread in this process.

    If the engine loop dies of a fault, its unfinished requests fail with
    ``internalError``, :attr:`ready` turns false, and a fresh loop is started on the
    same loaded model, at most ``max_restarts`` times per ``restart_window`` seconds;
    past that the client stays down and says so in the log.
    """

    def __init__(self, config, *, max_restarts: int = 3, restart_window: float = 600.0) -> None:
        super().__init__()  # config: EngineConfig, typed loosely to keep torch out of imports
        self._config = config
        self._core = None
        self._closed = False
        self._max_restarts = max_restarts
        self._restart_window = restart_window
        self._restarts: list[float] = []
        self._replacing: asyncio.Task | None = None
        self.restart_count = 0
        # Shared with every core this client starts, so counts survive a restart.
        self._stats = EngineStats()
        self.observers = Observers()

    def stats(self) -> EngineStats:
        core = self._core
        return core.snapshot() if core is not None else self._stats.copy()

    async def start(self) -> None:
        from .core import EngineCore  # imports torch

        loop = asyncio.get_running_loop()
        load = functools.partial(EngineCore.load, self._config, stats=self._stats, observers=self.observers)
        core = await loop.run_in_executor(None, load)
        self._start_core(core, loop)

    def _start_core(self, core, loop: asyncio.AbstractEventLoop) -> None:
        self._core = core
        core.start(
            lambda out: loop.call_soon_threadsafe(self._outputs.put_nowait, out),
            on_death=lambda: loop.call_soon_threadsafe(self._restart, core, loop),
        )

    def _restart(self, dead, loop: asyncio.AbstractEventLoop) -> None:
        if self._closed or self._core is not dead:
            return
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < self._restart_window]
        if len(self._restarts) >= self._max_restarts:
            logger.error(
                "the engine loop died %d times in %.0f s; not restarting it",
                len(self._restarts) + 1,
                self._restart_window,
            )
            return
        self._restarts.append(now)
        self.restart_count += 1
        logger.warning("restarting the engine loop (restart %d)", self.restart_count)
        self._replacing = loop.create_task(self._replace(dead, loop))

    async def _replace(self, dead, loop: asyncio.AbstractEventLoop) -> None:
        """Join the dead core's threads (so no two cores ever share the runner), then
        start a new core on the same loaded model."""
        from .core import EngineCore

        if not await loop.run_in_executor(None, dead.shutdown, 60.0):
            logger.error("not restarting the engine: threads of the dead one are still running")
            return
        if not self._closed and self._core is dead:
            core = EngineCore(dead.runner, self._config, stats=self._stats, observers=self.observers)
            self._start_core(core, loop)

    @property
    def ready(self) -> bool:
        return self._core is not None and self._core.alive

    def submit(self, request: UpscaleRequest) -> None:
        from .core import EngineStopped

        if not self.ready:
            raise EngineUnavailable("engine is not running")
        try:
            admitted = self._core.add_request(request)
        except EngineStopped as exc:
            raise EngineUnavailable(str(exc)) from exc
        if not admitted:
            raise EngineOverloaded(f"engine queue is full ({self._config.max_queue} requests)")

    async def abort(self, request_ids: Iterable[str]) -> None:
        if self._core is not None:
            self._core.abort(list(request_ids))

    async def close(self) -> None:
        self._closed = True
        if self._replacing is not None:
            # The dead core's threads are joined first; how that went was logged there.
            await asyncio.gather(self._replacing, return_exceptions=True)
        if self._core is not None:
            core, self._core = self._core, None
            await asyncio.get_running_loop().run_in_executor(None, core.shutdown)
        self._outputs.put_nowait(None)
