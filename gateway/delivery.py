"""The gateway's core: tasks in, engine requests out, each result delivered exactly once.

:class:`Gateway` owns the engine client, the image store, the gateway state (sessions
and task records: ``state.py``) and the outbound HTTP client. A peer (a socket, or a
REST request) hands it validated tasks; it registers each (``conflictTaskUUID`` for a
known one), resolves the input image (``inputs.py``), and submits an
:class:`~engine.api.UpscaleRequest`. One dispatcher task reads the engine's outputs,
keyed by ``request_id``: progress goes to the state while the task runs, and its
terminal output becomes the task's one answer (``completion.py``), recorded and
delivered by :meth:`GatewayState.finish` — to the socket for sync tasks (or kept for the
session's resume), to the record for ``getResponse``, and to the webhook if one was given.

In ``serve`` every store is in this process and nothing here waits: a task with an
inline or stored input is admitted, and its result delivered, without a task of its
own. In a cluster gateway the engine is the Redis queue (``cluster/queue.py``): workers
complete the tasks, and the dispatcher only hears that they are done (``Finished``).

The REST transport (``rest.py``) uses three methods beside those the socket uses:
:meth:`Gateway.submit_upscale` returns the task's record (and records a fingerprint of
its content, for retries), :meth:`Gateway.watch` hands over a record's terminal frame,
and :meth:`Gateway.record_frame` is a record's current answer; the state's ``lookup``,
``forget`` and ``transient_session`` serve its retries.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import orjson

from engine import codecs
from engine.api import (
    EngineError,
    ErrorCode,
    Finished,
    OutputFormat,
    Progress,
    UpscaleRequest,
    UpscaleResult,
)
from engine.client import EngineClient, EngineOverloaded, EngineUnavailable

from .completion import Completion, image_url, shutdown_error
from .config import GatewayConfig
from .errors import TaskError, internal_error
from .http import Outbound, OutboundError
from .images import ImageStore, MemoryImageStore, StoredImage
from .inputs import Inputs, is_url, is_uuid
from .metrics import Metrics
from .observe import TaskEnds
from .peer import Peer
from .protocol import GetResponse, ImageUpload, Upscale, data_frame, error_frame
from .session import SessionStore, TaskRecord
from .state import Admission, GatewayState, LocalState, progress_item

__all__ = ["Gateway", "engine_request", "task_context"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Pending:
    """An upscale the engine is working on, until its terminal output arrives."""

    record: TaskRecord
    task: Upscale
    peer: Peer
    input_uuid: str = ""
    accepted: float = dataclass_field(default_factory=time.monotonic)  # for its latency and log line
    submitted: float | None = None  # when it reached the engine


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        engine: EngineClient,
        *,
        clock: Callable[[], float] = time.monotonic,
        store: ImageStore | None = None,
        state: GatewayState | None = None,
        outbound: Outbound | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """``metrics``: where tasks, outbound requests and the engine's events are
        counted (:mod:`gateway.metrics`); None (``--no-metrics``) counts nothing."""
        self.config = config
        self.engine = engine
        self.clock = clock
        self.store = store or MemoryImageStore(config.store_bytes, clock)
        self.state = state or LocalState(
            SessionStore(session_ttl=config.session_ttl, record_ttl=config.record_ttl, clock=clock)
        )
        self.outbound = outbound or Outbound(
            allow_private=config.allow_private_networks, timeout=config.url_timeout
        )
        self.metrics = metrics
        if metrics is not None:
            metrics.watch_engine(engine)
            self.outbound.observe = metrics.outbound_done
        self.ends = TaskEnds(metrics)  # each task's end: counted, and its log line
        self.inputs = Inputs(self.store, self.outbound, max_bytes=config.max_input_bytes, ttl=config.output_ttl)
        self.completion = Completion(
            self.store,
            self.outbound,
            output_ttl=config.output_ttl,
            price_per_gpu_hour=config.price_per_gpu_hour,
        )
        self.state.whole_frame = self.completion.whole_frame
        # Whether awaiting the stores never waits: then a task is admitted and completed
        # inline, with no asyncio task of its own.
        self._inline = self.state.local and isinstance(self.store, MemoryImageStore)
        self._pending: dict[str, _Pending] = {}  # engine request id (the taskUUID) → task
        self._uploads: Counter[str] = Counter()  # API key → imageUpload tasks not yet answered
        self._jobs: set[asyncio.Task] = set()
        self._dispatcher: asyncio.Task | None = None

    # Lifecycle

    async def start(self) -> None:
        self.ends.watch(self.engine)
        await self.store.start()
        await self.state.start()
        await self.engine.start()
        self._dispatcher = asyncio.create_task(self._dispatch(), name="engine-outputs")

    @property
    def ready(self) -> bool:
        dispatching = self._dispatcher is not None and not self._dispatcher.done()
        return self.engine.ready and dispatching and self.state.ready

    @property
    def busy(self) -> int:
        """Tasks still being worked on (for graceful shutdown)."""
        return len(self._jobs) + len(self._pending)

    @property
    def sessions(self) -> SessionStore:
        """The in-process session store (``serve`` only; tests look inside it)."""
        assert isinstance(self.state, LocalState)
        return self.state.sessions

    def counts(self) -> dict[str, int]:
        """What the gateway holds now, for ``GET /stats``: upscale tasks not yet answered
        (all keys), those the engine is working on, and sessions with a live socket."""
        return {**self.state.counts(), "engine_tasks": len(self._pending)}

    async def close(self) -> None:
        await self.engine.close()
        if self._dispatcher is not None:
            await asyncio.wait([self._dispatcher], timeout=5)
        for job in list(self._jobs):
            job.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
        await self.outbound.aclose()
        await self.state.close()
        await self.store.close()

    def spawn(self, coro) -> asyncio.Task:
        job = asyncio.create_task(coro)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        return job

    # Upscale

    async def submit_upscale(
        self, peer: Peer, task: Upscale, *, fingerprint: bytes | None = None
    ) -> TaskRecord | None:
        """Admit an upscale task (checks that need no I/O happen here, in frame order).
        Returns its record, or None if it was refused (the error went to ``peer``).
        ``fingerprint``: a digest of the task's content, kept so a retry can attach."""
        needs_io = task.webhookURL or task.uploadEndpoint or is_url(task.image)  # DNS or a download
        storing = admit = None
        received = time.monotonic()
        try:
            self._check_upscale(peer, task)
            assert peer.session is not None
            if not (needs_io or self._inline):
                # A cluster takes an inline input, the record and the queue entry in one
                # round trip; other shared stores get the input while the task registers
                # (on a conflict the stored input just expires).
                admit = self._admission(task)
                if admit is None:
                    storing = asyncio.ensure_future(self.inputs.resolve_local(task.image, task.image_field))
            record = await self.state.register(
                peer.api_key,
                peer.session,
                task.taskUUID,
                task.taskType,
                task.deliveryMethod == "async",
                origin=peer,
                fingerprint=fingerprint,
                admit=admit,
            )
        except TaskError as error:
            if storing is not None:
                storing.add_done_callback(_consume)
            peer.send(error_frame(error.for_task(task.taskType, task.taskUUID)))
            self._refused(task, error.code, peer, received)
            return None
        peer.in_flight += 1
        if record.deliver_async:
            peer.send(data_frame({"taskType": task.taskType, "taskUUID": task.taskUUID}))
        pending = _Pending(record, task, peer, accepted=received)
        if needs_io:
            self.spawn(self._run_upscale(pending))
            return record
        if admit is not None and record.admitted:  # queued already: the dispatcher owns it
            self._track(pending, admit.image, admit.request.request_id)
            return record
        # The common case: no I/O but the image store's, admitted here and now.
        if admit is not None:  # the state could not take it (images in S3): decoded already
            storing = self.inputs.store_new(admit.image.data, admit.image.media_type)
        try:
            stored = await (storing or self.inputs.resolve_local(task.image, task.image_field))
        except Exception as exc:
            await self._end(pending, exc)
            return record
        await self._admit(pending, stored)
        return record

    async def watch(self, record: TaskRecord, send: Callable[[bytes], object]) -> None:
        """Call ``send`` once with ``record``'s terminal frame (its result or its error,
        payload included, as a sync task's peer gets it): now if it has finished, else
        when it does. For the REST transport, whose requests wait on task records."""
        if record.finished:
            send(await self.record_frame(record))
            return

        def done(finished: TaskRecord, frame: bytes | None) -> None:
            if frame is not None:
                send(frame)
            else:
                self.spawn(self.watch(finished, send))

        self.state.watch(record, done)

    def _check_upscale(self, peer: Peer, task: Upscale) -> None:
        if task.model is not None and task.model not in self.config.accepted_models:
            raise TaskError(
                "invalidModel",
                f"model {task.model[:100]!r} is not served here; use runware:502@1",
                parameter="model",
                type="string",
            )
        if task.settings.steps > self.config.max_steps:
            raise TaskError(
                "invalidSteps",
                f"settings.steps is {task.settings.steps}; this server allows at most {self.config.max_steps}",
                parameter="settings.steps",
                type="integer",
            )
        if task.ttl is not None and task.ttl > self.config.max_ttl:
            raise TaskError(
                "invalidTTL",
                f"ttl is {task.ttl} s; this server keeps outputs at most {self.config.max_ttl:g} s",
                parameter="ttl",
                type="integer",
            )
        self._check_in_flight_limits(peer)

    def _check_in_flight_limits(self, peer: Peer) -> None:
        """Upscales and uploads not yet answered, per connection and per API key."""
        if peer.in_flight >= self.config.max_in_flight_per_connection:
            raise TaskError(
                "rateLimitExceeded",
                f"this connection already has {peer.in_flight} tasks in flight "
                f"(limit {self.config.max_in_flight_per_connection}); wait for results before sending more",
            )
        key = peer.api_key
        if self.state.running(key) + self._uploads[key] >= self.config.max_in_flight_per_key:
            raise TaskError(
                "rateLimitExceeded",
                f"this API key already has {self.config.max_in_flight_per_key} tasks in flight; "
                "wait for results before sending more",
            )

    async def _run_upscale(self, pending: _Pending) -> None:
        """Check the outbound URLs and fetch the input, then admit the task."""
        try:
            await self._check_outbound_urls(pending.task)
            stored = await self.inputs.resolve(pending.task.image, pending.task.image_field)
        except BaseException as exc:
            await self._end(pending, exc)
            if not isinstance(exc, Exception):  # cancelled (shutdown), or worse
                raise
            return
        await self._admit(pending, stored)

    def _admission(self, task: Upscale) -> Admission | None:
        """For a remote engine, a task with an inline input: its request and its image,
        for the state to register, store and queue in one step. None otherwise, and for
        an input that does not decode (the usual path says why)."""
        if not self.engine.remote or is_uuid(task.image):
            return None
        try:
            image = self.inputs.prepare_inline(task.image, task.image_field)
        except TaskError:
            return None
        return Admission(self._request(task, image), image)

    def _request(self, task: Upscale, stored: StoredImage) -> UpscaleRequest:
        """The engine request of a task whose input is ``stored``."""
        # taskUUIDs are unique (the state refuses a known one), so they name requests.
        seed = task.settings.seed if task.settings.seed is not None else random.randrange(2**32)
        remote = {}
        if self.engine.remote:  # the request runs, and is completed, elsewhere
            context = task_context(task, seed, stored.image_uuid, self.config.base_url)
            remote = {"image_uuid": stored.image_uuid, "context": context}
        return engine_request(task.taskUUID, task, stored.data, seed, **remote)

    def _track(self, pending: _Pending, stored: StoredImage, request_id: str) -> None:
        """From here the dispatcher owns the task (:meth:`_complete`): no coroutine
        waits per running task."""
        pending.input_uuid = stored.image_uuid
        self._pending[request_id] = pending
        pending.submitted = time.monotonic()

    async def _admit(self, pending: _Pending, stored: StoredImage) -> None:
        """Submit to the engine."""
        request = self._request(pending.task, stored)
        # Tracked before submit(): an engine may answer before submit() returns.
        self._track(pending, stored, request.request_id)
        try:
            self.engine.submit(request)
        except Exception as exc:
            # Not admitted (submit() never consumes the id on failure): end it here.
            del self._pending[request.request_id]
            await self._end(pending, _admission_error(exc))

    async def _complete(self, pending: _Pending, output: UpscaleResult | EngineError) -> None:
        """The engine's terminal output for a task: its item (or error), delivered."""
        try:
            item = await self.completion.outcome(
                pending.task, output, pending.input_uuid, self.config.base_url
            )
        except BaseException as exc:
            await self._end(pending, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            await self._end(pending, item=item)

    async def _end(self, pending: _Pending, exc: BaseException | None = None, *, item: dict | None = None) -> None:
        """The one terminal item of a task: ``item``, or the error ``exc`` stands for."""
        task = pending.task
        pending.peer.in_flight -= 1
        error = None if exc is None else self._as_task_error(task, exc)
        await self.finish(
            pending.record,
            task,
            item=item,
            error=error,
            origin=pending.peer,
            accepted=pending.accepted,
            submitted=pending.submitted,
        )

    @staticmethod
    def _as_task_error(task: Upscale, exc: BaseException) -> TaskError:
        if isinstance(exc, TaskError):
            return exc.for_task(task.taskType, task.taskUUID)
        if isinstance(exc, asyncio.CancelledError):
            return shutdown_error(task.taskUUID, task.taskType)
        logger.error("task %s failed", task.taskUUID, exc_info=exc)
        return internal_error(task.taskType, task.taskUUID)

    async def finish(
        self,
        record: TaskRecord,
        task: Upscale,
        *,
        item: dict | None = None,
        error: TaskError | None = None,
        origin: Peer | None = None,
        accepted: float | None = None,
        submitted: float | None = None,
    ) -> None:
        """Record and deliver a task's terminal item (once), then post its webhook.
        ``accepted`` and ``submitted`` (``time.monotonic()``: when the task was accepted
        and when it reached the engine) time it in the metrics and its log line."""
        webhook = task.webhookURL
        if not await self.state.finish(record, item=item, error=error, origin=origin, webhook=webhook):
            return
        if webhook and not self.state.queues_webhooks:
            self.spawn(self.post_webhook(webhook, item if error is None else error.to_wire()))
        now = time.monotonic()
        self.ends.ended(
            task.taskUUID,
            task.taskType,
            record.session.session_id,
            code=None if error is None else error.code,
            deliver_async=record.deliver_async,
            total=0.0 if accepted is None else now - accepted,
            timed=accepted is not None,
            before_engine=None if submitted is None or accepted is None else submitted - accepted,
        )

    def _refused(self, task: Upscale | ImageUpload, code: str | None, peer: Peer, received: float) -> None:
        """An upscale refused at admission, or an imageUpload's answer: counted, not timed."""
        self.ends.ended(
            task.taskUUID,
            task.taskType,
            peer.session.session_id if peer.session is not None else None,
            code=code,
            deliver_async=getattr(task, "deliveryMethod", "sync") == "async",
            total=time.monotonic() - received,
            timed=False,
        )

    async def post_webhook(self, url: str, body: dict) -> bool:
        """POST a result item (retried per the outbound policy); False if it never got through."""
        whole = await self.completion.whole_item(body)  # (a cluster queues large payloads without)
        if whole is None:
            logger.warning("webhook for %s not posted: its image could not be read back", body.get("taskUUID"))
            return False
        body = whole
        try:
            await self.outbound.post_json(url, orjson.dumps(body))
        except OutboundError as exc:
            logger.warning("webhook for %s failed: %s", body.get("taskUUID"), exc)
            return False
        return True

    async def _check_outbound_urls(self, task: Upscale) -> None:
        for field, url in (("webhookURL", task.webhookURL), ("uploadEndpoint", task.uploadEndpoint)):
            if url is None:
                continue
            try:
                await self.outbound.guard.check(url)
            except OutboundError as exc:
                code = f"invalid{field[0].upper()}{field[1:]}"
                raise TaskError(code, str(exc), parameter=field, type="string") from exc

    def image_url(self, image: StoredImage) -> str:
        return image_url(self.config.base_url, image)

    # Engine outputs

    async def _dispatch(self) -> None:
        """Route each engine output to its task by ``request_id``; a terminal one
        completes the task here, once (it leaves ``_pending`` as it is taken)."""
        async for output in self.engine.outputs():
            if isinstance(output, Progress):
                pending = self._pending.get(output.request_id)
                if pending is not None:
                    self.state.progress(pending.record, output.percent, live=pending.task.includeProgress)
                continue
            pending = self._pending.pop(output.request_id, None)
            if pending is None:
                continue
            if isinstance(output, Finished):  # completed and delivered where it ran
                pending.peer.in_flight -= 1
                self.state.settled(pending.record)
                continue
            if pending.task.uploadEndpoint or not self._inline:
                self.spawn(self._complete(pending, output))  # it waits for I/O
                continue
            try:
                await self._complete(pending, output)
            except Exception:  # a bug here must not stop the delivery of every other task
                logger.exception("delivering task %s failed", pending.task.taskUUID)
        # The engine stopped: nothing more will come for what is still pending.
        if self.engine.remote:  # in a cluster the tasks live on: other gateways deliver them
            self._pending.clear()
            return
        stopped = "the server is shutting down; the task was not finished"
        for request_id in list(self._pending):
            output = EngineError(request_id, ErrorCode.ABORTED, stopped)
            await self._complete(self._pending.pop(request_id), output)

    # Upload and getResponse

    def submit_upload(self, peer: Peer, task: ImageUpload) -> None:
        """Admit an imageUpload: it counts toward the connection's tasks in flight
        until its answer is sent, like an upscale."""
        try:
            self._check_in_flight_limits(peer)
        except TaskError as error:
            peer.send(error_frame(error.for_task("imageUpload", task.taskUUID)))
            self._refused(task, error.code, peer, time.monotonic())
            return
        peer.in_flight += 1
        self._uploads[peer.api_key] += 1
        self.spawn(self._run_image_upload(peer, task))

    async def _run_image_upload(self, peer: Peer, task: ImageUpload) -> None:
        key = peer.api_key
        received = time.monotonic()
        code: str | None = "internalError"
        try:
            frame, code = await self._image_upload_frame(task)
            peer.send(frame)
        except asyncio.CancelledError:
            code = "taskAborted"
            peer.send(error_frame(shutdown_error(task.taskUUID, "imageUpload")))
            raise
        except Exception:
            logger.exception("imageUpload %s failed", task.taskUUID)
            peer.send(error_frame(internal_error("imageUpload", task.taskUUID)))
        finally:
            peer.in_flight -= 1
            self._uploads[key] -= 1
            if not self._uploads[key]:
                del self._uploads[key]
            self._refused(task, code, peer, received)

    async def _image_upload_frame(self, task: ImageUpload) -> tuple[bytes, str | None]:
        """The answer to an imageUpload (the stored image's UUID, or why it was
        refused) and its error code (None: stored)."""
        try:
            stored = await self.inputs.resolve(task.image, "image")
            await asyncio.to_thread(
                codecs.decode_image,
                stored.data,
                max_pixels=self.config.engine.max_input_pixels,
                min_side=self.config.engine.min_input_side,
            )
        except codecs.ImageError as exc:
            error = TaskError(str(exc.code), str(exc), parameter="image", type="string")
            return error_frame(error.for_task("imageUpload", task.taskUUID)), error.code
        except TaskError as error:
            return error_frame(error.for_task("imageUpload", task.taskUUID)), error.code
        frame = data_frame(
            {
                "taskType": "imageUpload",
                "taskUUID": task.taskUUID,
                "imageUUID": stored.image_uuid,
                "imageURL": await self.completion.url(self.config.base_url, stored),
            }
        )
        return frame, None

    async def get_response(self, peer: Peer, task: GetResponse) -> None:
        try:
            record = await self.state.lookup(peer.api_key, task.taskUUID)
        except TaskError as error:  # the cluster's Redis cannot be reached (serviceUnavailable)
            peer.send(error_frame(error.for_task("getResponse", task.taskUUID)))
            return
        if record is None:
            error = TaskError(
                "invalidTaskUUID",
                "no task with this taskUUID is known for this API key (it may have expired)",
                parameter="taskUUID",
                type="string",
                task_type="getResponse",
                task_uuid=task.taskUUID,
            )
            peer.send(error_frame(error))
        else:
            peer.send(await self.record_frame(record))

    async def record_frame(self, record: TaskRecord) -> bytes:
        """A task's current state as ``getResponse`` answers it: its result, its error, or
        a processing item with its progress."""
        if record.status == "success":
            try:
                return data_frame(await self.completion.with_payload(record.item))
            except TaskError as error:  # its payload is in a store that cannot be reached
                return error_frame(error.for_task(record.task_type, record.task_uuid))
        if record.status == "error":
            return error_frame(record.error)
        return data_frame(progress_item(record, record.progress))


def engine_request(
    request_id: str, task: Upscale, image: bytes, seed: int, *, image_uuid: str = "", context: bytes = b""
) -> UpscaleRequest:
    """The engine's view of an upscale task."""
    settings = task.settings
    return UpscaleRequest(
        request_id=request_id,
        image=image,
        prompt=settings.positivePrompt,
        negative_prompt=settings.negativePrompt,
        steps=settings.steps,
        cfg_scale=settings.CFGScale,
        clip_skip=settings.clipSkip,
        seed=seed,
        output_format=OutputFormat(task.outputFormat),
        output_quality=task.outputQuality,
        # Progress feeds includeProgress items and getResponse polls; skip it otherwise.
        want_progress=task.includeProgress or task.deliveryMethod == "async",
        image_uuid=image_uuid,
        context=context,
    )


def task_context(task: Upscale, seed: int, input_uuid: str, base_url: str) -> bytes:
    """What a remote worker needs to complete ``task``: the task itself (its input now
    the stored image's UUID, its seed fixed), and where its ``imageURL`` points."""
    body = task.model_dump(mode="json", exclude_none=True)
    if task.image_field == "inputs.image":
        body["inputs"]["image"] = input_uuid
    else:
        body["inputImage"] = input_uuid
    body.setdefault("settings", {})["seed"] = seed
    return orjson.dumps({"task": body, "input": input_uuid, "base": base_url})


def _consume(future: asyncio.Future) -> None:
    """Retrieve a finished future's exception nobody waits for (so it is not logged)."""
    if not future.cancelled():
        future.exception()


def _admission_error(exc: Exception) -> Exception:
    """What a refused :meth:`EngineClient.submit` means to the client."""
    if isinstance(exc, EngineOverloaded):
        return TaskError("rateLimitExceeded", f"the server is at capacity ({exc}); try again shortly")
    if isinstance(exc, EngineUnavailable):
        return TaskError("internalError", "the engine is not running; try again shortly")
    return exc
