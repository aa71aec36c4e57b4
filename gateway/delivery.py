"""The gateway's core: tasks in, engine requests out, each result delivered exactly once.

:class:`Gateway` owns the engine client, the image store, the sessions and the
outbound HTTP client. A connection hands it validated tasks; it resolves the input
image, submits an :class:`~engine.api.UpscaleRequest`, and turns the engine's outputs
(read by one dispatcher task, keyed by ``request_id``) back into Runware items:
progress items while it runs, then one terminal item — to the socket for sync tasks
(or into the session's replay buffer when the socket is gone), to the task record for
``getResponse``, and to the webhook if one was given.

Whoever sent a task is a :class:`~gateway.peer.Peer` (a WebSocket connection, or one
task of a REST request). The REST transport uses four methods beside those the socket
uses: :meth:`Gateway.submit_upscale` returns the task's record, :meth:`Gateway.watch`
hands over a record's terminal frame, :meth:`Gateway.record_frame` is a record's current
answer, and ``Gateway.sessions`` (lookup, forget, transient) for retries.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from engine import codecs
from engine.api import EngineError, ErrorCode, OutputFormat, Progress, UpscaleRequest, UpscaleResult
from engine.client import EngineClient, EngineOverloaded, EngineUnavailable

from .config import GatewayConfig
from .errors import TaskError, internal_error
from .http import Outbound, OutboundError
from .images import ImageStore, MemoryImageStore, StoredImage
from .peer import Peer
from .protocol import GetResponse, ImageUpload, Upscale, data_frame, error_frame
from .session import Session, SessionStore, TaskRecord

__all__ = ["Gateway"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Pending:
    """An upscale the engine is working on, until its terminal output arrives."""

    record: TaskRecord
    task: Upscale
    connection: Peer
    input_uuid: str = ""


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        engine: EngineClient,
        *,
        clock: Callable[[], float] = time.monotonic,
        store: ImageStore | None = None,
        outbound: Outbound | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.clock = clock
        self.store = store or MemoryImageStore(config.store_bytes, clock)
        self.outbound = outbound or Outbound(
            allow_private=config.allow_private_networks, timeout=config.url_timeout
        )
        self.sessions = SessionStore(
            session_ttl=config.session_ttl, record_ttl=config.record_ttl, clock=clock
        )
        self._attached: dict[str, Peer] = {}  # session id → its live connection
        self._pending: dict[str, _Pending] = {}  # engine request id → task
        self._uploads: Counter[str] = Counter()  # API key → imageUpload tasks not yet answered
        self._request_ids = itertools.count()
        self._jobs: set[asyncio.Task] = set()
        self._dispatcher: asyncio.Task | None = None

    # Lifecycle

    async def start(self) -> None:
        await self.engine.start()
        self._dispatcher = asyncio.create_task(self._dispatch(), name="engine-outputs")

    @property
    def ready(self) -> bool:
        return self.engine.ready and self._dispatcher is not None and not self._dispatcher.done()

    @property
    def busy(self) -> int:
        """Tasks still being worked on (for graceful shutdown)."""
        return len(self._jobs) + len(self._pending)

    async def close(self) -> None:
        await self.engine.close()
        if self._dispatcher is not None:
            await asyncio.wait([self._dispatcher], timeout=5)
        for job in list(self._jobs):
            job.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
        await self.outbound.aclose()

    def spawn(self, coro) -> None:
        job = asyncio.create_task(coro)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    # Sessions and delivery

    def attach(self, session: Session, connection: Peer) -> None:
        self._attached[session.session_id] = connection

    def detach(self, session: Session, connection: Peer) -> None:
        if self._attached.get(session.session_id) is connection:
            del self._attached[session.session_id]
            self.sessions.detach(session)

    def deliver(self, session: Session, frame: bytes) -> None:
        """Send ``frame`` on the session's socket, or keep it for when it resumes."""
        connection = self._attached.get(session.session_id)
        if connection is None or not connection.send(frame):
            self.sessions.keep(session, frame)

    def _deliver_error(self, session: Session, frame: bytes, origin: Peer | None) -> None:
        """An error goes where a result would, except to a socket other than the one
        that sent the task whose client cannot route it (``replays_errors``, see
        connection.py): the task record keeps it for getResponse."""
        connection = self._attached.get(session.session_id)
        if connection is not None and connection is not origin and not connection.replays_errors:
            return
        self.deliver(session, frame)

    def _finish(
        self,
        pending_record: TaskRecord,
        task,
        *,
        item: dict | None = None,
        error: TaskError | None = None,
        origin: Peer,
    ):
        # The record keeps the item without its image payload (getResponse rebuilds it from
        # the image store), so an hour of task records never holds an hour of images.
        if not self.sessions.finish(pending_record, item=_without_payload(item), error=error):
            return
        frame = None
        if not pending_record.deliver_async:
            frame = data_frame(item) if error is None else error_frame(error)
            if error is None:
                self.deliver(pending_record.session, frame)
            else:
                self._deliver_error(pending_record.session, frame, origin)
        if pending_record.watchers:  # REST requests waiting for this task (see watch)
            if frame is None:
                frame = data_frame(item) if error is None else error_frame(error)
            watchers, pending_record.watchers = pending_record.watchers, None
            for watcher in watchers:
                watcher(frame)
        webhook = getattr(task, "webhookURL", None)
        if webhook:
            body = item if error is None else error.to_wire()
            self.spawn(self._post_webhook(webhook, body))

    async def _post_webhook(self, url: str, body: dict) -> None:
        import orjson

        try:
            await self.outbound.post_json(url, orjson.dumps(body))
        except OutboundError as exc:
            logger.warning("webhook for %s failed: %s", body.get("taskUUID"), exc)

    # Upscale

    def watch(self, record: TaskRecord, callback: Callable[[bytes], object]) -> None:
        """Call ``callback`` once with ``record``'s terminal frame (its result or its error,
        payload included, as a sync task's peer gets it): now if it has finished, else when
        it does. For the REST transport, whose requests wait on task records."""
        if record.finished:
            callback(self.record_frame(record))
        elif record.watchers is None:
            record.watchers = [callback]
        else:
            record.watchers.append(callback)

    def submit_upscale(self, connection: Peer, task: Upscale) -> TaskRecord | None:
        """Admit an upscale task (checks that need no I/O happen here, in frame order).
        Returns its record, or None if it was refused (the error went to ``connection``)."""
        try:
            self._check_upscale(connection, task)
            record = self.sessions.register(
                connection.api_key,
                connection.session,
                task.taskUUID,
                task.taskType,
                task.deliveryMethod == "async",
            )
        except TaskError as error:
            connection.send(error_frame(error.for_task(task.taskType, task.taskUUID)))
            return None
        connection.in_flight += 1
        if record.deliver_async:
            connection.send(data_frame({"taskType": task.taskType, "taskUUID": task.taskUUID}))
        if task.webhookURL or task.uploadEndpoint or _is_url(task.image):
            self.spawn(self._run_upscale(connection, record, task))  # DNS or a download first
            return record
        # The common case needs no I/O: admitted here and now, with no task of its own.
        pending = _Pending(record, task, connection)
        try:
            data, pending.input_uuid = self.resolve_local_image(task.image, task.image_field)
        except Exception as exc:
            self._end(pending, exc)
            return record
        self._admit(pending, data)
        return record

    def _check_upscale(self, connection: Peer, task: Upscale) -> None:
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
        self._check_in_flight_limits(connection)

    def _check_in_flight_limits(self, connection: Peer) -> None:
        """Upscales and uploads not yet answered, per connection and per API key."""
        if connection.in_flight >= self.config.max_in_flight_per_connection:
            raise TaskError(
                "rateLimitExceeded",
                f"this connection already has {connection.in_flight} tasks in flight "
                f"(limit {self.config.max_in_flight_per_connection}); wait for results before sending more",
            )
        key = connection.api_key
        if self.sessions.running(key) + self._uploads[key] >= self.config.max_in_flight_per_key:
            raise TaskError(
                "rateLimitExceeded",
                f"this API key already has {self.config.max_in_flight_per_key} tasks in flight; "
                "wait for results before sending more",
            )

    async def _run_upscale(self, connection: Peer, record: TaskRecord, task: Upscale) -> None:
        """Check the outbound URLs and fetch the input, then admit the task."""
        pending = _Pending(record, task, connection)
        try:
            await self._check_outbound_urls(task)
            data, pending.input_uuid = await self.resolve_image(task.image, task.image_field)
        except BaseException as exc:
            self._end(pending, exc)
            if not isinstance(exc, Exception):  # cancelled (shutdown), or worse
                raise
            return
        self._admit(pending, data)

    def _admit(self, pending: _Pending, data: bytes) -> None:
        """Submit to the engine. From then on the dispatcher owns the task
        (:meth:`_complete`): no coroutine waits per running task."""
        request_id = f"r{next(self._request_ids)}"  # unique in this process, which is all it needs
        # Registered before submit(): an engine may answer before submit() returns.
        self._pending[request_id] = pending
        try:
            self.engine.submit(self._engine_request(request_id, pending.task, data))
        except Exception as exc:
            # Not admitted (submit() never consumes the id on failure): end it here.
            del self._pending[request_id]
            self._end(pending, _admission_error(exc))

    def _complete(self, pending: _Pending, output: UpscaleResult | EngineError) -> None:
        """The engine's terminal output for a task: build its item and deliver it."""
        if isinstance(output, UpscaleResult) and pending.task.uploadEndpoint:
            self.spawn(self._complete_after_upload(pending, output))
            return
        try:
            if isinstance(output, EngineError):
                raise _engine_error(output, pending.task.image_field)
            stored = self._store_output(pending.task, output)
            item = self._result_item(pending.task, output, stored, pending.input_uuid)
        except Exception as exc:
            self._end(pending, exc)
        else:
            self._end(pending, item=item)

    async def _complete_after_upload(self, pending: _Pending, result: UpscaleResult) -> None:
        """The uploadEndpoint gets the bytes before the result is reported."""
        try:
            stored = self._store_output(pending.task, result)
            await self._upload(pending.task, result, stored)
            item = self._result_item(pending.task, result, stored, pending.input_uuid)
        except BaseException as exc:
            self._end(pending, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            self._end(pending, item=item)

    def _end(self, pending: _Pending, exc: BaseException | None = None, *, item: dict | None = None) -> None:
        """The one terminal item of a task: ``item``, or the error ``exc`` stands for."""
        task = pending.task
        pending.connection.in_flight -= 1
        if exc is None:
            self._finish(pending.record, task, item=item, origin=pending.connection)
            return
        if isinstance(exc, TaskError):
            error = exc.for_task(task.taskType, task.taskUUID)
        elif isinstance(exc, asyncio.CancelledError):
            error = _shutdown_error(task.taskUUID, task.taskType)
        else:
            logger.error("task %s failed", task.taskUUID, exc_info=exc)
            error = internal_error(task.taskType, task.taskUUID)
        self._finish(pending.record, task, error=error, origin=pending.connection)

    async def _check_outbound_urls(self, task: Upscale) -> None:
        for field, url in (("webhookURL", task.webhookURL), ("uploadEndpoint", task.uploadEndpoint)):
            if url is None:
                continue
            try:
                await self.outbound.guard.check(url)
            except OutboundError as exc:
                code = f"invalid{field[0].upper()}{field[1:]}"
                raise TaskError(code, str(exc), parameter=field, type="string") from exc

    @staticmethod
    def _engine_request(request_id: str, task: Upscale, data: bytes) -> UpscaleRequest:
        settings = task.settings
        return UpscaleRequest(
            request_id=request_id,
            image=data,
            prompt=settings.positivePrompt,
            negative_prompt=settings.negativePrompt,
            steps=settings.steps,
            cfg_scale=settings.CFGScale,
            clip_skip=settings.clipSkip,
            seed=settings.seed if settings.seed is not None else random.randrange(2**32),
            output_format=OutputFormat(task.outputFormat),
            output_quality=task.outputQuality,
            # Progress feeds includeProgress items and getResponse polls; skip it otherwise.
            want_progress=task.includeProgress or task.deliveryMethod == "async",
        )

    def _store_output(self, task: Upscale, result: UpscaleResult) -> StoredImage:
        ttl = task.ttl or self.config.output_ttl
        return self.store.put(result.image, result.output_format.media_type, ttl)

    async def _upload(self, task: Upscale, result: UpscaleResult, stored: StoredImage) -> None:
        try:
            await self.outbound.put_bytes(task.uploadEndpoint, result.image, stored.media_type)
        except OutboundError as exc:
            raise TaskError(
                "uploadFailed",
                f"uploading the result to uploadEndpoint failed ({exc}); the image stays retrievable "
                f"as {stored.image_uuid} for its TTL",
                parameter="uploadEndpoint",
                type="string",
            ) from exc

    def _result_item(
        self, task: Upscale, result: UpscaleResult, stored: StoredImage, input_uuid: str
    ) -> dict:
        fmt = result.output_format
        item = {
            "taskType": task.taskType,
            "taskUUID": task.taskUUID,
            "status": "success",
            "imageUUID": stored.image_uuid,
            "inputImageUUID": input_uuid,
            "seed": result.seed,
        }
        if task.outputType == "URL":
            item["imageURL"] = self.image_url(stored)
        elif task.outputType == "base64Data":
            item["imageBase64Data"] = base64.b64encode(result.image).decode()
        else:
            item["imageDataURI"] = f"data:{fmt.media_type};base64,{base64.b64encode(result.image).decode()}"
        if task.includeCost:
            item["cost"] = round(result.engine_seconds / 3600 * self.config.price_per_gpu_hour, 8)
        return item

    def _with_payload(self, item: dict) -> dict:
        """A success item as first sent: base64/data URI payloads come back from the store."""
        kind = item.get("_payload")
        if kind is None:
            return item
        item = {k: v for k, v in item.items() if k != "_payload"}
        stored = self.store.get(item["imageUUID"])
        if stored is not None:
            encoded = base64.b64encode(stored.data).decode()
            item[kind] = (
                encoded if kind == "imageBase64Data" else f"data:{stored.media_type};base64,{encoded}"
            )
        return item

    def image_url(self, image: StoredImage) -> str:
        return f"{self.config.base_url}/images/{image.image_uuid}.{image.extension}"

    # Engine outputs

    async def _dispatch(self) -> None:
        """Route each engine output to its task by ``request_id``; a terminal one
        completes the task here, once (it leaves ``_pending`` as it is taken)."""
        async for output in self.engine.outputs():
            if isinstance(output, Progress):
                pending = self._pending.get(output.request_id)
                if pending is not None:
                    self._progress(pending, output)
                continue
            pending = self._pending.pop(output.request_id, None)
            if pending is None:
                continue
            try:
                self._complete(pending, output)
            except Exception:  # a bug here must not stop the delivery of every other task
                logger.exception("delivering task %s failed", pending.task.taskUUID)
        # The engine stopped: nothing more will come for what is still pending.
        stopped = "the server is shutting down; the task was not finished"
        for request_id in list(self._pending):
            self._complete(self._pending.pop(request_id), EngineError(request_id, ErrorCode.ABORTED, stopped))

    def _progress(self, pending: _Pending, progress: Progress) -> None:
        record = pending.record
        record.progress = progress.percent
        if pending.task.includeProgress and not record.deliver_async and not record.finished:
            item = {
                "taskType": record.task_type,
                "taskUUID": record.task_uuid,
                "status": "processing",
                "progress": progress.percent,
            }
            self.deliver(record.session, data_frame(item))

    # Inputs

    async def resolve_image(self, value: str, field: str) -> tuple[bytes, str]:
        """(bytes, image UUID) of an input given as a stored UUID, data URI, URL or
        raw base64. New inputs are stored so later tasks can reuse them by UUID."""
        if not _is_url(value):
            return self.resolve_local_image(value, field)
        data = await self._fetch(value, field)
        return data, self._store_input(data)

    def resolve_local_image(self, value: str, field: str) -> tuple[bytes, str]:
        """:meth:`resolve_image` for anything but a URL: no I/O."""
        if _is_uuid(value):
            stored = self.store.get(value)
            if stored is None:
                raise TaskError(
                    "invalidInputImage",
                    f"image {value} is unknown or has expired; upload it again",
                    parameter=field,
                    type="string",
                )
            return stored.data, stored.image_uuid
        data, media_type = _decode_inline(value, field, self.config.max_input_bytes)
        return data, self._store_input(data, media_type)

    def _store_input(self, data: bytes, media_type: str | None = None) -> str:
        """Store an input; ``media_type`` is what its bytes were sniffed as, if that was done."""
        media_type = media_type or codecs.sniff_media_type(data) or "application/octet-stream"
        return self.store.put(data, media_type, self.config.output_ttl).image_uuid

    async def _fetch(self, url: str, field: str) -> bytes:
        try:
            data, _ = await self.outbound.fetch(url, max_bytes=self.config.max_input_bytes)
        except OutboundError as exc:
            message = f"could not use the image URL: {exc}"
            raise TaskError("invalidInputImage", message, parameter=field, type="string") from exc
        return data

    # Upload and getResponse

    def submit_upload(self, connection: Peer, task: ImageUpload) -> None:
        """Admit an imageUpload: it counts toward the connection's tasks in flight
        until its answer is sent, like an upscale."""
        try:
            self._check_in_flight_limits(connection)
        except TaskError as error:
            connection.send(error_frame(error.for_task("imageUpload", task.taskUUID)))
            return
        connection.in_flight += 1
        self._uploads[connection.api_key] += 1
        self.spawn(self._run_image_upload(connection, task))

    async def _run_image_upload(self, connection: Peer, task: ImageUpload) -> None:
        key = connection.api_key
        try:
            connection.send(await self._image_upload_frame(task))
        except asyncio.CancelledError:
            connection.send(error_frame(_shutdown_error(task.taskUUID, "imageUpload")))
            raise
        except Exception:
            logger.exception("imageUpload %s failed", task.taskUUID)
            connection.send(error_frame(internal_error("imageUpload", task.taskUUID)))
        finally:
            connection.in_flight -= 1
            self._uploads[key] -= 1
            if not self._uploads[key]:
                del self._uploads[key]

    async def _image_upload_frame(self, task: ImageUpload) -> bytes:
        """The answer to an imageUpload: the stored image's UUID, or why it was refused."""
        try:
            data, image_uuid = await self.resolve_image(task.image, "image")
            await asyncio.to_thread(
                codecs.decode_image,
                data,
                max_pixels=self.config.engine.max_input_pixels,
                min_side=self.config.engine.min_input_side,
            )
        except codecs.ImageError as exc:
            error = TaskError(str(exc.code), str(exc), parameter="image", type="string")
            return error_frame(error.for_task("imageUpload", task.taskUUID))
        except TaskError as error:
            return error_frame(error.for_task("imageUpload", task.taskUUID))
        stored = self.store.get(image_uuid)
        return data_frame(
            {
                "taskType": "imageUpload",
                "taskUUID": task.taskUUID,
                "imageUUID": image_uuid,
                "imageURL": self.image_url(stored) if stored else None,
            }
        )

    def get_response(self, connection: Peer, task: GetResponse) -> None:
        record = self.sessions.lookup(connection.api_key, task.taskUUID)
        if record is None:
            error = TaskError(
                "invalidTaskUUID",
                "no task with this taskUUID is known for this API key (it may have expired)",
                parameter="taskUUID",
                type="string",
                task_type="getResponse",
                task_uuid=task.taskUUID,
            )
            connection.send(error_frame(error))
        else:
            connection.send(self.record_frame(record))

    def record_frame(self, record: TaskRecord) -> bytes:
        """A task's current state as ``getResponse`` answers it: its result, its error, or
        a processing item with its progress."""
        if record.status == "success":
            return data_frame(self._with_payload(record.item))
        if record.status == "error":
            return error_frame(record.error)
        return data_frame(
            {
                "taskType": record.task_type,
                "taskUUID": record.task_uuid,
                "status": "processing",
                "progress": record.progress,
            }
        )


def _without_payload(item: dict | None) -> dict | None:
    if item is None:
        return None
    for kind in ("imageBase64Data", "imageDataURI"):
        if kind in item:
            return {**{k: v for k, v in item.items() if k != kind}, "_payload": kind}
    return item


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def _admission_error(exc: Exception) -> Exception:
    """What a refused :meth:`EngineClient.submit` means to the client."""
    if isinstance(exc, EngineOverloaded):
        return TaskError("rateLimitExceeded", f"the server is at capacity ({exc}); try again shortly")
    if isinstance(exc, EngineUnavailable):
        return TaskError("internalError", "the engine is not running; try again shortly")
    return exc


def _is_uuid(value: str) -> bool:
    if len(value) != 36:
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _decode_inline(value: str, field: str, max_bytes: int) -> tuple[bytes, str | None]:
    """The bytes of a data URI or raw base64, and the media type they were sniffed as."""
    declared = None
    if value.startswith("data:"):
        header, sep, value = value.partition(",")
        if not sep or not header.endswith(";base64"):
            raise TaskError(
                "invalidInputImage",
                "a data URI must look like data:image/png;base64,<data>",
                parameter=field,
                type="string",
            )
        declared = header[5:-7].lower()
        if not declared.startswith("image/"):
            raise TaskError(
                "invalidInputImage",
                f"the data URI's media type {declared!r} is not an image type",
                parameter=field,
                type="string",
            )
    if len(value) > max_bytes * 4 // 3 + 4:
        raise TaskError(
            "invalidInputImage", f"the image is over {max_bytes} bytes", parameter=field, type="string"
        )
    try:
        data = binascii.a2b_base64(value, strict_mode=True)  # validates as it decodes
    except (binascii.Error, ValueError) as exc:
        raise TaskError(
            "invalidInputImage",
            "inputImage is not an image UUID, a data URI, an http(s) URL or valid base64",
            parameter=field,
            type="string",
        ) from exc
    if not data:
        raise TaskError("invalidInputImage", "the image is empty", parameter=field, type="string")
    sniffed = codecs.sniff_media_type(data)
    if declared and sniffed and sniffed != declared and declared != "image/jpg":
        raise TaskError(
            "invalidInputImage",
            f"the data URI says {declared} but the data is {sniffed}",
            parameter=field,
            type="string",
        )
    return data, sniffed


def _engine_error(error: EngineError, field: str) -> TaskError:
    if error.code is ErrorCode.INTERNAL:
        return internal_error()
    if error.code is ErrorCode.OVERLOADED:
        return TaskError("rateLimitExceeded", error.message)
    if error.code is ErrorCode.ABORTED:
        return TaskError("taskAborted", error.message)
    code = {"invalidImage": "invalidInputImage"}.get(str(error.code), str(error.code))
    return TaskError(code, error.message, parameter=field, type="string")


def _shutdown_error(task_uuid: str, task_type: str) -> TaskError:
    return TaskError(
        "taskAborted",
        "the server shut down before the task finished",
        task_type=task_type,
        task_uuid=task_uuid,
    )
