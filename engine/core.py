"""The engine loop: connects the scheduler (decides) and the runner (runs the model).

Three stages, each on its own threads, connected by queues of plain requests:

- the codec pool decodes each input image (Pillow) and, at the end, encodes each
  output to JPG/PNG/WEBP;
- the VAE thread text- and VAE-encodes newcomers, batched by size, and VAE-decodes
  requests that took their last step, also batched, while the UNet keeps running;
- the model thread runs only UNet steps. Each turn of its loop, like vLLM's
  ``EngineCore.step()``: take new input (prepared newcomers join their shape group at
  this tick boundary; aborts; blocking only when there is nothing to do), then
  ``schedule()`` one UNet call and run it; requests that took their last step leave
  at once for the VAE thread.

Faults stay with the request at fault: a batched call that raises is split in halves
and retried until the failing request stands alone; an out-of-memory error shrinks the
row budget instead, which grows back once calls succeed again. On CUDA the two model
threads take turns on the device (``EngineConfig.vae_overlap``), so a VAE decode never
takes the memory a UNet step counted on. If either thread dies of a fault, the core
fails every unfinished request and reports its death (``on_death``). Every request
ends exactly once (``_finish``).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from . import codecs
from .api import EngineError, EngineOutput, ErrorCode, Progress, UpscaleRequest, UpscaleResult
from .config import EngineConfig
from .request import Request, RequestStatus
from .runner import ModelRunner, PreparedInput, timed
from .scheduler import ScheduledBatch, Scheduler
from .stats import EngineStats, Observers, RequestDone, UnetCall, VaeCall

__all__ = ["EngineCore", "EngineStopped"]

logger = logging.getLogger(__name__)

Emit = Callable[[EngineOutput], None]


class EngineCore:
    """The model thread, the VAE thread and the codec pool. Thread-safe entry points:
    :meth:`add_request`, :meth:`abort`, :meth:`shutdown`. The scheduler belongs to the
    model thread; a request in ``DECODING`` belongs to the VAE thread, then the pool."""

    def __init__(
        self,
        runner: ModelRunner,
        config: EngineConfig,
        *,
        stats: EngineStats | None = None,
        observers: Observers | None = None,
    ) -> None:
        self.runner = runner
        self.config = config
        # Counters and observers may outlive this core (a restarted engine keeps them).
        self.stats = stats if stats is not None else EngineStats()
        self.observers = observers if observers is not None else Observers()
        self.scheduler = Scheduler(
            config.max_batch_rows,
            mode=config.mode,
            policy=config.group_policy,
            static_delay=config.static_batch_delay,
        )
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._codec_pool = ThreadPoolExecutor(config.codec_threads, thread_name_prefix="engine-codec")
        self._requests: dict[str, Request] = {}  # every unfinished request, by id
        self._lock = threading.Lock()  # guards _requests and terminal outputs
        self._early: list[EngineOutput] = []  # outputs emitted before start(), flushed then
        self._emit: Emit = self._early.append
        self._thread: threading.Thread | None = None
        self._vae_inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("encode" | "decode", …); None stops
        self._vae_thread: threading.Thread | None = None
        self._stopping = False
        self._dead = False
        self._on_death: Callable[[], None] | None = None
        # Held around every model call when UNet and VAE work must not overlap.
        overlap = config.overlaps_vae(torch.device(runner.device).type)
        self._device_turn = contextlib.nullcontext() if overlap else _Turns()

    @classmethod
    def load(cls, config: EngineConfig, **kwargs) -> EngineCore:
        """Load the model named by ``config`` (blocking) and build an idle core
        (``kwargs``: ``stats`` and ``observers`` to share). ``sim:FIXED_MS,PER_ROW_MS``
        is the simulated model of ``engine.sim`` (benchmarks only)."""
        from .sim import SIM_PREFIX, SimRunner, parse_sim

        if config.model.startswith(SIM_PREFIX):
            return cls(SimRunner(*parse_sim(config.model)), config, **kwargs)
        from .loader import load_pipeline  # diffusers: only for a real model

        loaded = load_pipeline(config)
        runner = ModelRunner(
            loaded.pipeline, device=loaded.device, dtype=loaded.dtype, text_cache_size=config.text_cache_size
        )
        return cls(runner, config, **kwargs)

    # Thread-safe entry points

    def start(self, emit: Emit, on_death: Callable[[], None] | None = None) -> None:
        """Start the model thread; every output goes to ``emit`` (from any thread).
        ``on_death`` is called (on the thread that died) if a thread dies of a fault, after
        every unfinished request was failed with ``internalError``."""
        self._on_death = on_death
        with self._lock:
            self._emit = emit
            early, self._early = self._early, []
        for output in early:
            emit(output)
        self._vae_thread = threading.Thread(target=self._run_vae_loop, name="engine-vae", daemon=True)
        self._vae_thread.start()
        self._thread = threading.Thread(target=self._run_loop, name="engine-model", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        threads = (self._thread, self._vae_thread)
        return all(t is not None and t.is_alive() for t in threads) and not self._stopping

    def snapshot(self) -> EngineStats:
        """The counters, with the requests held now counted by stage."""
        with self._lock:
            statuses = [request.status for request in self._requests.values()]
        return self.stats.copy(
            waiting=sum(s <= RequestStatus.PREPARING for s in statuses),
            denoising=sum(s == RequestStatus.DENOISING for s in statuses),
            decoding=sum(s == RequestStatus.DECODING for s in statuses),
        )

    def add_request(self, api: UpscaleRequest) -> bool:
        """Admit ``api``; False if the queue is full. Its image is decoded on the pool.
        Raises :class:`EngineStopped` once the loop has stopped or died."""
        with self._lock:
            if self._stopping:
                raise EngineStopped("the engine loop is not running")
            if len(self._requests) >= self.config.max_queue:
                return False
            if api.request_id in self._requests:
                raise ValueError(f"request {api.request_id!r} is already in the engine")
            request = Request(api)
            self._requests[api.request_id] = request
        try:
            self._codec_pool.submit(self._decode_input, request)
        except RuntimeError as exc:  # the pool was shut down since the check above
            with self._lock:
                self._requests.pop(api.request_id, None)
            raise EngineStopped("the engine loop is not running") from exc
        return True

    def abort(self, request_ids: Iterable[str]) -> None:
        self._inbox.put(("abort", list(request_ids)))

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Stop the threads (the model thread first, so that requests that take their
        last step meanwhile are still decoded); unfinished requests end with
        ``ABORTED``. Returns True if every thread stopped within ``timeout`` seconds
        each: only then is the runner free of this core's state, for a new core."""
        self._stopping = True
        self._inbox.put(("stop", None))
        lingering = []
        if self._thread is not None:
            self._thread.join(timeout)
            lingering += [self._thread.name] if self._thread.is_alive() else []
        self._vae_inbox.put(None)
        if self._vae_thread is not None:
            self._vae_thread.join(timeout)
            lingering += [self._vae_thread.name] if self._vae_thread.is_alive() else []
        self._codec_pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            leftover = list(self._requests.values())
        for request in leftover:
            self._finish(request, _shut_down(request))
        if lingering:
            logger.error("engine threads %s did not stop within %.1f s", ", ".join(lingering), timeout)
            return False
        self.runner.states.clear()
        return True

    # Codec pool: decode an input, encode an output

    def _decode_input(self, request: Request) -> None:
        started = time.perf_counter()
        try:
            image = codecs.decode_image(
                request.api.image,
                max_pixels=self.config.max_input_pixels,
                min_side=self.config.min_input_side,
            )
            array = codecs.image_to_array(image)
            padded = codecs.pad_to_multiple(array, codecs.PAD_MULTIPLE, min_size=codecs.PAD_MIN)
            prepared = PreparedInput(padded, image.height, image.width, image.alpha)
        except codecs.ImageError as exc:
            self._finish(request, EngineError(request.request_id, exc.code, str(exc)))
            return
        except Exception:
            logger.exception("decoding the input of %s failed", request.request_id)
            self._finish(request, _internal(request))
            return
        request.engine_seconds += time.perf_counter() - started
        request.shape = (padded.shape[0] // 8, padded.shape[1] // 8)
        with self._lock:
            if request.status.finished:
                return  # aborted while it was being decoded
            request.status = RequestStatus.PREPARING
        self._vae_inbox.put(("encode", (request, prepared)))

    def _encode_output(self, request: Request, pixels, alpha) -> None:
        started = time.perf_counter()
        try:
            image = codecs.array_to_image(pixels, alpha)
            data = codecs.encode_image(image, request.api.output_format, request.api.output_quality)
        except Exception:
            logger.exception("encoding the output of %s failed", request.request_id)
            self._finish(request, _internal(request))
            return
        request.engine_seconds += time.perf_counter() - started
        self._finish(
            request,
            UpscaleResult(
                request_id=request.request_id,
                image=data,
                output_format=request.api.output_format,
                width=image.width,
                height=image.height,
                seed=request.api.seed,
                engine_seconds=request.engine_seconds,
                unet_calls=request.unet_calls,
                max_batch_rows=request.max_batch_rows,
            ),
        )

    # Exactly once

    def _finish(self, request: Request, output: EngineOutput) -> None:
        """Send ``request``'s terminal output unless it already ended."""
        with self._lock:
            if request.status.finished or self._requests.get(request.request_id) is not request:
                return
            del self._requests[request.request_id]
            request.status = _final_status(output)
            if request.status is RequestStatus.FINISHED_OK:
                self.stats.succeeded += 1
            else:
                self.stats.failed += 1
            emit = self._emit
        # Observed before it is emitted: whoever handles the output can find its event.
        if self.observers:
            self.observers(_request_done(request, output))
        emit(output)

    # The model thread: UNet steps only.

    def _die(self, thread: str) -> None:
        """A thread died of a fault: stop the others, fail every unfinished request,
        and report the death once (the runner's state is cleared by :meth:`shutdown`)."""
        logger.exception("the engine's %s thread died", thread)
        with self._lock:
            first, self._dead = not self._dead, True
            self._stopping = True
            leftover = list(self._requests.values())
        for request in leftover:
            self._finish(request, _internal(request))
        self._inbox.put(("stop", None))
        self._vae_inbox.put(None)
        self._codec_pool.shutdown(wait=False, cancel_futures=True)
        if first and self._on_death is not None:
            self._on_death()

    def _run_loop(self) -> None:
        logger.info(
            "engine loop started (%s rows per call, %s batching)", self.scheduler.max_rows, self.config.mode
        )
        try:
            with torch.inference_mode():
                while not self._stopping:
                    self._take_input()
                    batch = self.scheduler.schedule()
                    if batch is not None:
                        self._run_batch(batch)
                    self._decode_released()
                self._decode_released()  # finished before the stop: still decoded
        except Exception:
            self._die("model")

    def _take_input(self) -> None:
        """Apply everything in the inbox; wait for input only when there is no work."""
        busy = self.scheduler.has_work
        timeout = self.scheduler.wait_time() if busy else None
        block = not busy or (timeout is not None and timeout > 0)
        while True:
            try:
                kind, payload = self._inbox.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "stop":
                self._stopping = True
                return
            if kind == "ready":
                self._join(payload)
            elif kind == "abort":
                self._apply_aborts(payload)

    def _join(self, requests: list[Request]) -> None:
        """Prepared requests join their shape group at this tick boundary."""
        for request in requests:
            if request.status.finished:  # aborted while the VAE thread prepared it
                self.runner.release(request.request_id)
            else:
                self.scheduler.add(request)

    def _apply_aborts(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            with self._lock:
                request = self._requests.get(request_id)
            if request is None or request.status >= RequestStatus.DECODING:
                continue  # unknown, finished, or too late to matter
            self.scheduler.remove(request)
            self.runner.release(request_id)
            self._finish(request, EngineError(request_id, ErrorCode.ABORTED, "task was cancelled"))

    def _run_batch(self, batch: ScheduledBatch) -> None:
        try:
            self._isolate(self._step, list(batch.requests), tick=batch.tick)
        except _OutOfMemory:
            rows = self.scheduler.shrink()
            logger.warning("out of memory at %d rows; row budget is now %d", batch.rows, rows)
            return
        grown = self.scheduler.settle(batch.rows)
        if grown is not None:
            logger.info("no out-of-memory error for a while; row budget is now %d", grown)

    def _step(self, requests: list[Request], tick: int) -> None:
        batch = ScheduledBatch(requests[0].shape, tuple(requests), sum(r.rows for r in requests), tick)
        with self._device_turn:
            _, seconds = timed(self.runner.step, batch)
        self._count_unet_call(batch, seconds)
        finished = []
        now = time.monotonic()
        for request in requests:
            if request.first_step_at is None:
                request.first_step_at = now
            request.step_index += 1
            request.unet_calls += 1
            request.max_batch_rows = max(request.max_batch_rows, batch.rows)
            request.engine_seconds += seconds * request.rows / batch.rows
            if request.api.want_progress or (request.api.want_denoised and request.done_denoising):
                self._emit(Progress(request.request_id, request.step_index, request.total_steps))
            if request.done_denoising:
                request.denoised_at = now
                finished.append(request)
        for request in finished:
            request.status = RequestStatus.DECODING
        self.scheduler.finish(finished)

    def _count_unet_call(self, batch: ScheduledBatch, seconds: float) -> None:
        stats = self.stats  # written by the model thread only
        stats.unet_calls += 1
        stats.unet_rows += batch.rows
        stats.unet_seconds += seconds
        if self.observers:
            self.observers(UnetCall(batch.rows, len(batch.requests), seconds, batch.shape))

    def _count_vae_call(self, op: str, items: int, seconds: float) -> None:
        stats = self.stats  # written by the VAE thread only
        if op == "encode":
            stats.encode_calls += 1
            stats.encoded += items
            stats.encode_seconds += seconds
        else:
            stats.decode_calls += 1
            stats.decoded += items
            stats.decode_seconds += seconds
        if self.observers:
            self.observers(VaeCall(op, items, seconds))

    def _decode_released(self) -> None:
        released = self.scheduler.take_released()
        if released:
            self._vae_inbox.put(("decode", released))

    def _fail(self, request: Request) -> None:
        self.scheduler.remove(request)
        self.runner.release(request.request_id)
        self._finish(request, _internal(request))

    # The VAE thread: text and VAE encoding of newcomers, then decoding of finished
    # requests, each batched by shape, while the model thread goes on stepping.

    def _run_vae_loop(self) -> None:
        try:
            self._serve_vae()
        except Exception:
            self._die("VAE")

    def _serve_vae(self) -> None:
        stop = False
        while not stop:
            pending = [self._vae_inbox.get()]
            while True:  # everything that arrived meanwhile rides in the same batches
                try:
                    pending.append(self._vae_inbox.get_nowait())
                except queue.Empty:
                    break
            stop = None in pending or self._dead
            jobs = [] if self._dead else [job for job in pending if job is not None]
            with torch.inference_mode():
                # Newcomers first: they hold up UNet work; finished ones only wait for bytes.
                encodes = [item for kind, item in jobs if kind == "encode"]
                for shape, items in _by_shape(encodes, lambda item: item[0].shape).items():
                    self._in_chunks(self._prepare_chunk, items, shape[0] * shape[1] * 64)
                decodes = [r for kind, batch in jobs if kind == "decode" for r in batch]
                for shape, requests in _by_shape(decodes, lambda r: r.shape).items():
                    self._in_chunks(self._decode_chunk, requests, shape[0] * shape[1] * 256)

    def _in_chunks(self, call: Callable, items: list, pixels_per_item: int) -> None:
        """``call`` over ``items`` in chunks bounded by ``vae_batch_pixels``, each
        isolated; the VAE thread outlives anything a chunk does."""
        per_call = max(1, self.config.vae_batch_pixels // pixels_per_item)
        for i in range(0, len(items), per_call):
            chunk = items[i : i + per_call]
            try:
                self._isolate(call, chunk, shrink_on_oom=False, fail=self._fail_in_vae)
            except Exception:
                logger.exception("a VAE batch of %d failed", len(chunk))
                for item in chunk:
                    self._fail_in_vae(item[0] if isinstance(item, tuple) else item)

    def _prepare_chunk(self, items: list[tuple[Request, PreparedInput]]) -> None:
        live = [(r, p) for r, p in items if not r.status.finished]
        if not live or self._stopping:
            return  # nothing to do; or no model loop will take them (shutdown aborts them)
        requests = [r for r, _ in live]
        with self._device_turn:
            _, seconds = timed(self.runner.prepare, requests, [p for _, p in live])
        self._count_vae_call("encode", len(requests), seconds)
        for request in requests:
            request.engine_seconds += seconds / len(requests)
        if self._stopping:  # no model loop will take them (their requests have ended)
            for request in requests:
                self.runner.release(request.request_id)
            return
        self._inbox.put(("ready", requests))

    def _decode_chunk(self, requests: list[Request]) -> None:
        for request in [r for r in requests if r.status.finished]:  # failed meanwhile (core died)
            self.runner.release(request.request_id)
        requests = [r for r in requests if not r.status.finished]
        if not requests:
            return
        with self._device_turn:
            images, seconds = timed(self.runner.decode, requests)
        self._count_vae_call("decode", len(requests), seconds)
        for request, pixels in zip(requests, images):
            request.engine_seconds += seconds / len(requests)
            alpha = self.runner.states[request.request_id].prepared.alpha
            self.runner.release(request.request_id)
            try:
                self._codec_pool.submit(self._encode_output, request, pixels, alpha)
            except RuntimeError:  # the pool was shut down under us: no bytes will come
                self._finish(request, _shut_down(request))

    def _fail_in_vae(self, request: Request) -> None:
        self.runner.release(request.request_id)
        self._finish(request, _internal(request))

    def _isolate(
        self,
        call: Callable,
        items: list,
        *,
        shrink_on_oom: bool = True,
        fail: Callable[[Request], None] | None = None,
        **kwargs,
    ) -> None:
        """Run ``call(items)``; if it raises, split in halves and retry until the faulty
        item stands alone, and fail only that one. With ``shrink_on_oom``, an
        out-of-memory error of a batch propagates as ``_OutOfMemory`` (the caller then
        shrinks the row budget and the same requests run again next tick); otherwise
        it is isolated like any other fault."""
        try:
            call(items, **kwargs)
            return
        except Exception as exc:
            if len(items) == 1:
                request = items[0][0] if isinstance(items[0], tuple) else items[0]
                logger.exception("request %s failed in %s", request.request_id, call.__name__)
                (fail or self._fail)(request)
                return
            if shrink_on_oom and _is_oom(exc):
                raise _OutOfMemory() from exc
            logger.warning("a batch of %d failed in %s (%s); isolating", len(items), call.__name__, exc)
        half = len(items) // 2
        for part in (items[:half], items[half:]):
            self._isolate(call, part, shrink_on_oom=False, fail=fail, **kwargs)


class _Turns:
    """A lock that hands over in the order of asking. With ``threading.Lock`` the model
    thread, which asks again at once, could keep the device from the VAE thread for
    several steps in a row."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                self._cond.wait()

    def __exit__(self, *exc_info) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class EngineStopped(RuntimeError):
    """The engine loop has stopped (shut down, or died of a fault)."""


class _OutOfMemory(Exception):
    pass


def _by_shape(items: list, shape_of: Callable) -> dict[tuple[int, int], list]:
    groups: dict[tuple[int, int], list] = defaultdict(list)
    for item in items:
        groups[shape_of(item)].append(item)
    return groups


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()


def _final_status(output: EngineOutput) -> RequestStatus:
    if isinstance(output, UpscaleResult):
        return RequestStatus.FINISHED_OK
    if isinstance(output, EngineError) and output.code is ErrorCode.ABORTED:
        return RequestStatus.FINISHED_ABORTED
    return RequestStatus.FINISHED_ERROR


def _request_done(request: Request, output: EngineOutput) -> RequestDone:
    def since(at: float | None) -> float | None:
        return None if at is None else at - request.arrival

    outcome = "success" if isinstance(output, UpscaleResult) else str(output.code)
    return RequestDone(
        request.request_id,
        outcome,
        since(request.first_step_at),
        since(request.denoised_at),
        time.monotonic() - request.arrival,
    )


def _internal(request: Request) -> EngineError:
    return EngineError(request.request_id, ErrorCode.INTERNAL, "the engine failed to process this task")


def _shut_down(request: Request) -> EngineError:
    return EngineError(request.request_id, ErrorCode.ABORTED, "the engine shut down")
