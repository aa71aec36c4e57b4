"""The REST transport: ``POST /v1`` (also ``/v1/`` and ``/``) with a JSON array of tasks.

An aiohttp server on a port of its own (``--http-port``; Runware too serves REST and
WebSocket on separate hosts, and the SDKs take two base URLs). It also answers the
``GET`` endpoints of :mod:`gateway.routes` (images, health, readiness), and CORS
preflights for the origins of ``--cors-origin``.

One request, from the wire to its answer::

    body ≤ --max-frame-bytes ──▶ parse_frame (the socket's validation) ──▶ authenticate
        ──▶ each task into its _Slot (the Peer the gateway answers that task to)
        ──▶ wait until every slot has its answer, at most --rest-timeout
        ──▶ {"data": [...], "errors": [...]} in task order, with one HTTP status

- Authentication: ``Authorization: Bearer KEY``, or an ``authentication`` task first in
  the array (answered with ``{"taskType": "authentication"}``); the socket's keys,
  constant-time comparison and per-address failure limit (one shared ``AuthLimiter``).
- A sync upscale's answer is its record's terminal frame (:meth:`Gateway.watch`): the
  request reads task records, not a session, so a client that hangs up loses nothing
  (the task finishes and ``getResponse`` has it) and a retry can wait for the same task.
- Time-out: a task unfinished after ``--rest-timeout`` is answered ``timeout`` (504) and
  goes on; ``getResponse`` or the same request again gets its result later.
- Retries (the SDKs re-POST the same ``taskUUID`` after a time-out, a 429 or a 5xx): the
  same key and the same content attach to the task (a sync task's result when it has
  one, an async task's acknowledgement), and a task that failed with a 429 or 5xx error
  runs again; another content or another key gets ``conflictTaskUUID`` (409), as does a
  ``taskUUID`` first sent on a WebSocket.
- Status: 200 when every answer is a success; otherwise the highest status among the
  errors (:func:`status_of`), so that a retryable 429/5xx wins and the SDKs retry, which
  is safe since finished tasks attach. ``errors`` is never empty, and never sent with 200.
  Faults of the request itself: 400 (not a JSON array of tasks), 401/429 (key), 413
  (body or task count over the limits), 408 (a body still not in after ``--idle-timeout``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

import orjson
import pydantic_core
from aiohttp import HttpVersion11, web

from .connection import AuthLimiter, key_accepted
from .delivery import Gateway
from .errors import TaskError, internal_error
from .protocol import (
    Authentication,
    GetResponse,
    ImageUpload,
    Ping,
    TooManyTasks,
    Upscale,
    data_frame,
    error_frame,
    parse_frame,
)
from .routes import HttpResponse, Routes, text
from .session import Session, TaskRecord

__all__ = ["REST_PATHS", "RestServer", "status_of"]

logger = logging.getLogger(__name__)

REST_PATHS = ("/", "/v1", "/v1/")
JSON = "application/json"
SERVER = "latent-upscale-gateway"  # as the WebSocket port's server_header
_SERVER_HEADER = {"Server": SERVER}
_JSON_HEADERS = {"Content-Type": JSON, "Server": SERVER}
_PONG = data_frame({"taskType": "ping", "pong": True})
_AUTHENTICATED = data_frame({"taskType": "authentication"})
# The frames the gateway builds (protocol.data_frame / error_frame), whose items are
# spliced into one response without parsing them again.
_DATA, _ERRORS = b'{"data":[', b'{"errors":['
_ALLOWED_HEADERS = "Authorization, Content-Type, X-SDK-Name, X-SDK-Version"


def status_of(code: str, *, get_response: bool = False) -> int:
    """The HTTP status of an error ``code`` (PROTOCOL.md's mapping). ``get_response``:
    the error answers a valid getResponse task, whose unknown id is a 404."""
    if code in ("invalidApiKey", "missingApiKey", "notAuthenticated"):
        return 401
    if code == "invalidTaskUUID" and get_response:
        return 404
    if code.startswith("conflict"):
        return 409
    if code.startswith(("invalid", "missing", "unsupported")):
        return 400
    if code == "rateLimitExceeded":
        return 429
    if code.startswith("timeout"):
        return 504
    if code in ("serviceUnavailable", "taskAborted"):  # not ready, or shutting down
        return 503
    if code == "uploadFailed":  # the task's uploadEndpoint, an upstream server, failed
        return 502
    return 500


class _Slot:
    """One task of a request: the :class:`~gateway.peer.Peer` the gateway answers it to.
    Its first frame is its answer."""

    __slots__ = ("__weakref__", "exchange", "frame", "task_type", "task_uuid")
    replays_errors = True

    def __init__(self, exchange: _Exchange, task) -> None:
        self.exchange = exchange
        self.frame: bytes | None = None
        self.task_type: str | None = getattr(task, "taskType", None)
        self.task_uuid: str | None = getattr(task, "taskUUID", None)

    @property
    def api_key(self) -> str:
        return self.exchange.api_key

    @property
    def session(self) -> Session:
        return self.exchange.session

    @property
    def in_flight(self) -> int:
        return self.exchange.in_flight

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        self.exchange.in_flight = value

    def send(self, frame: bytes, **_) -> bool:
        self.exchange.answer(self, frame)
        return True

    def status(self) -> int:
        assert self.frame is not None
        if self.frame.startswith(_DATA):
            return 200
        get_response = self.task_type == "getResponse"  # a valid one (an invalid one is a TaskError)
        codes = [e.get("code", "") for e in orjson.loads(self.frame)["errors"]]
        return max(status_of(code, get_response=get_response) for code in codes)


class _Exchange:
    """One request's tasks, their answers and the wait for them. Tasks in flight are
    counted per request: on REST, ``--max-in-flight-per-connection`` bounds one body."""

    def __init__(self, gateway: Gateway, api_key: str, session: Session) -> None:
        self.gateway = gateway
        self.api_key = api_key
        self.session = session  # REST's transient one
        self.in_flight = 0
        self.slots: list[_Slot] = []
        self._unanswered = 0
        self._all_answered: asyncio.Future | None = None
        self._closed = False

    def answer(self, slot: _Slot, frame: bytes) -> None:
        if slot.frame is not None or self._closed:
            return  # a slot's first answer counts (a late one after a time-out is dropped)
        slot.frame = frame
        self._unanswered -= 1
        if not self._unanswered and self._all_answered is not None and not self._all_answered.done():
            self._all_answered.set_result(None)

    async def add(self, task, *, first: bool) -> None:
        slot = _Slot(self, None if isinstance(task, TaskError) else task)
        self.slots.append(slot)
        self._unanswered += 1
        if isinstance(task, TaskError):
            slot.send(error_frame(task))
        elif isinstance(task, Ping):
            slot.send(_PONG)
        elif isinstance(task, Authentication):
            if first:
                slot.send(_AUTHENTICATED)  # (checked before any task was added)
            else:
                slot.send(error_frame(_misplaced_authentication()))
        elif isinstance(task, Upscale):
            await self._upscale(slot, task)
        elif isinstance(task, ImageUpload):
            self.gateway.submit_upload(slot, task)
        elif isinstance(task, GetResponse):
            await self.gateway.get_response(slot, task)

    async def _upscale(self, slot: _Slot, task: Upscale) -> None:
        gateway = self.gateway
        if not gateway.ready:
            slot.send(error_frame(_not_ready(task)))
            return
        fingerprint = _fingerprint(task)
        try:
            known = await gateway.state.lookup(self.api_key, task.taskUUID)
            if known is not None and known.fingerprint == fingerprint:
                if not _runs_again(known):
                    await self._attach(slot, known)
                    return
                await gateway.state.forget(known)
        except TaskError as error:  # the shared state is unreachable (a cluster's Redis)
            slot.send(error_frame(error.for_task(task.taskType, task.taskUUID)))
            return
        record = await gateway.submit_upscale(slot, task, fingerprint=fingerprint)
        if record is None:
            return  # refused: the error is in the slot
        if not record.deliver_async:  # (an async task's acknowledgement is in the slot)
            await gateway.watch(record, slot.send)

    async def _attach(self, slot: _Slot, record: TaskRecord) -> None:
        """A retry of a task this key sent with the same content: its acknowledgement
        (async), or its result when it has one (sync)."""
        if record.deliver_async:
            slot.send(data_frame({"taskType": record.task_type, "taskUUID": record.task_uuid}))
        else:
            await self.gateway.watch(record, slot.send)

    async def wait(self, timeout: float) -> None:
        """Until every slot has its answer, or ``timeout`` seconds (then the slots still
        waiting are answered ``timeout``); no answer counts after that."""
        try:
            if self._unanswered:
                loop = asyncio.get_running_loop()
                self._all_answered = loop.create_future()
                # A timer handle: cheaper per request than asyncio.timeout().
                timer = loop.call_later(timeout, self._time_out, timeout)
                try:
                    await self._all_answered
                finally:
                    timer.cancel()
        finally:
            self._closed = True  # also when the client hung up (the handler is cancelled)

    def _time_out(self, timeout: float) -> None:
        for slot in self.slots:
            if slot.frame is None:
                self.answer(slot, error_frame(_timed_out(slot, timeout)))

    def response(self) -> tuple[int, bytes]:
        """The status and body: every answer's items in task order."""
        if len(self.slots) == 1:  # the SDKs' case: the one answer is the body
            slot = self.slots[0]
            assert slot.frame is not None
            return slot.status(), slot.frame
        data, errors, error_status = [], [], 0
        for slot in self.slots:
            frame = slot.frame
            assert frame is not None
            if frame.startswith(_DATA):
                data.append(frame[len(_DATA) : -2])
            else:
                errors.append(frame[len(_ERRORS) : -2])
                error_status = max(error_status, slot.status())
        return error_status or 200, _body(data, errors)


class RestServer:
    """``await RestServer(gateway, limiter, routes).start(host, port)``; ``close()`` at the end."""

    def __init__(self, gateway: Gateway, limiter: AuthLimiter, routes: Routes) -> None:
        self.gateway = gateway
        self.config = gateway.config
        self.limiter = limiter
        self.routes = routes
        self._cors = frozenset(self.config.cors_origins)
        self._session = gateway.state.transient_session()
        # Without configured keys (a loopback host only), any key is accepted: decided once.
        self._any_key = not self.config.api_keys and key_accepted(self.config, "")
        self._runner: web.ServerRunner | None = None
        self._site: web.TCPSite | None = None
        self.port: int | None = None  # the port it listens on, once started

    async def start(self, host: str, port: int) -> None:
        server = web.Server(
            self._handle,
            # A client that hangs up cancels its request's wait (its tasks go on).
            handler_cancellation=True,
            access_log=None,
            keepalive_timeout=self.config.idle_timeout,
        )
        self._runner = web.ServerRunner(server, shutdown_timeout=5.0)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, host, port)
        await self._site.start()
        self.port = self._runner.addresses[0][1]

    def open_connections(self) -> int:
        """HTTP connections open now (idle keep-alive ones included), for the metrics."""
        server = self._runner.server if self._runner is not None else None
        return 0 if server is None else len(server.connections)

    async def stop_accepting(self) -> None:
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def close(self) -> None:
        """Stop accepting and close the connections (requests still waiting get 5 s)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # Requests

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        cors = {**self._cors_headers(request), "Server": SERVER} if self._cors else _SERVER_HEADER
        path = request.raw_path.partition("?")[0]  # (request.path decodes a URL: not needed here)
        if request.method == "POST" and path in REST_PATHS:
            status, body = await self._post(request)
            headers = {**cors, **_extra_headers(status)} if status != 200 or self._cors else _JSON_HEADERS
            return web.Response(status=status, body=body, headers=headers)
        if request.method == "OPTIONS":
            return self._preflight(request, cors)
        if request.method in ("GET", "HEAD"):
            answer = await self.routes.get(path)
            if answer is None and path in REST_PATHS:
                answer = _not_allowed()
            if answer is not None and answer.stream is not None:  # a large image from S3
                return await _streamed(request, answer, cors)
            return _response(answer or text(404, "not found"), cors)
        return _response(_not_allowed() if path in REST_PATHS else text(404, "not found"), cors)

    async def _post(self, request: web.BaseRequest) -> tuple[int, bytes]:
        """A request's status and body: read, parse, authenticate, run its tasks."""
        header_key = _bearer(request.headers.get("Authorization", ""))
        if header_key is not None:  # checked before the body is even read
            refusal = self._check_key(request, header_key)
            if refusal is not None:
                return refusal
        body = await self._body(request)
        if isinstance(body, tuple):
            return body
        try:
            parsed = parse_frame(body.decode(), max_tasks=self.config.max_tasks_per_frame)
        except UnicodeDecodeError:
            parsed = TaskError("invalidJSON", "the request body is not UTF-8 JSON")
        if isinstance(parsed, TaskError):
            return _request_error(413 if isinstance(parsed, TooManyTasks) else 400, parsed)
        key, refusal = self._authenticate(request, header_key, parsed)
        if refusal is not None:
            return refusal
        exchange = _Exchange(self.gateway, key or "", self._session)
        for index, task in enumerate(parsed):
            try:
                await exchange.add(task, first=index == 0)
            except Exception:
                logger.exception("handling a REST task failed")
                slot = exchange.slots[-1]
                slot.send(error_frame(internal_error(slot.task_type, slot.task_uuid)))
        await exchange.wait(self.config.rest_timeout)
        return exchange.response()

    async def _body(self, request: web.BaseRequest) -> bytes | tuple[int, bytes]:
        """The body, or the refusal: over --max-frame-bytes (413), or still not all in
        after --idle-timeout (408), as a socket that silent would be closed."""
        limit = self.config.max_frame_bytes
        try:
            length = request.content_length
            if length is not None and request.content.total_bytes >= length:
                body = await _read_body(request, limit)  # all here already: no timer needed
            else:
                async with asyncio.timeout(self.config.idle_timeout):
                    body = await _read_body(request, limit)
        except TimeoutError:
            error = TaskError(
                "timeout", f"the request body did not arrive within {self.config.idle_timeout:g} s"
            )
            return _request_error(408, error)
        if body is None:
            error = TaskError(
                "invalidPayload",
                f"the request body is over {limit} bytes (--max-frame-bytes); send fewer tasks per "
                "request, or images by URL or uploaded UUID",
            )
            return _request_error(413, error)
        return body

    def _authenticate(
        self, request: web.BaseRequest, header_key: str | None, tasks: list
    ) -> tuple[str | None, tuple[int, bytes] | None]:
        """The request's API key (already checked if it came in the header), or why not."""
        first = tasks[0]
        if isinstance(first, TaskError) and first.task_type == "authentication":
            return None, self._refuse(request, first.code, first.message)
        task_key = first.apiKey if isinstance(first, Authentication) else None
        if isinstance(first, Authentication) and not task_key and header_key is None:
            return None, self._refuse(request, "missingApiKey", "apiKey is required")
        if header_key is not None:
            if task_key is not None and task_key != header_key:
                return None, self._refuse(
                    request, "invalidApiKey", "the Authorization header and the authentication task differ"
                )
            return header_key, None
        if task_key is not None:
            return task_key, self._check_key(request, task_key)
        if all(isinstance(task, Ping | TaskError) for task in tasks):
            return None, None  # nothing that needs a key
        return None, self._refuse(
            request,
            "missingApiKey",
            'send the API key as "Authorization: Bearer KEY", or an authentication task first',
        )

    def _check_key(self, request: web.BaseRequest, key: str) -> tuple[int, bytes] | None:
        if self.limiter.blocked(_peer(request)):
            return _request_error(
                429,
                TaskError(
                    "rateLimitExceeded",
                    "too many failed authentications from this address; wait a minute",
                    parameter="apiKey",
                    type="string",
                    task_type="authentication",
                ),
            )
        if self._any_key or key_accepted(self.config, key):
            return None
        return self._refuse(request, "invalidApiKey", "the API key is not valid")

    def _refuse(self, request: web.BaseRequest, code: str, message: str) -> tuple[int, bytes]:
        self.limiter.failed(_peer(request))
        error = TaskError(code, message, parameter="apiKey", type="string", task_type="authentication")
        return _request_error(401, error)

    # CORS

    def _cors_headers(self, request: web.BaseRequest) -> dict[str, str]:
        """With --cors-origin: the request's Origin, when allowed, echoed (so ``*`` works
        with the Authorization header too); ``Vary: Origin`` either way, for caches."""
        origin = request.headers.get("Origin")
        if origin is None or (origin not in self._cors and "*" not in self._cors):
            return {"Vary": "Origin"}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}

    def _preflight(self, request: web.BaseRequest, cors: dict[str, str]) -> web.Response:
        if "Access-Control-Request-Method" not in request.headers:
            return web.Response(status=204, headers={**cors, "Allow": "GET, HEAD, POST, OPTIONS"})
        if "Access-Control-Allow-Origin" not in cors:
            return _response(text(403, "this origin is not allowed (--cors-origin)"), cors)
        headers = {
            **cors,
            "Access-Control-Allow-Methods": "GET, HEAD, POST, OPTIONS",
            "Access-Control-Allow-Headers": _ALLOWED_HEADERS,
            "Access-Control-Max-Age": "600",
        }
        return web.Response(status=204, headers=headers)


def _fingerprint(task: Upscale) -> bytes:
    """A digest of what the task asks for: a retry must ask for the same."""
    return hashlib.blake2b(pydantic_core.to_json(task), digest_size=16).digest()


def _runs_again(record: TaskRecord) -> bool:
    """A retry runs a finished task again if it failed for a reason a retry may cure
    (the statuses the SDKs retry: 429 and 5xx)."""
    return record.status == "error" and record.error is not None and status_of(record.error.code) >= 429


def _body(data: list[bytes], errors: list[bytes]) -> bytes:
    parts = []
    if data:
        parts.append(b'"data":[' + b",".join(data) + b"]")
    if errors:
        parts.append(b'"errors":[' + b",".join(errors) + b"]")
    return b"{" + b",".join(parts) + b"}"


def _request_error(status: int, error: TaskError) -> tuple[int, bytes]:
    return status, error_frame(error)


def _extra_headers(status: int) -> dict[str, str]:
    if status == 401:
        return {"Content-Type": JSON, "WWW-Authenticate": 'Bearer realm="runware"'}
    if status in (429, 503):
        return {"Content-Type": JSON, "Retry-After": "1"}
    return {"Content-Type": JSON}


def _bearer(header: str) -> str | None:
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


def _peer(request: web.BaseRequest) -> str:
    return request.remote or "?"


async def _read_body(request: web.BaseRequest, limit: int) -> bytes | None:
    """The whole body, or None if it is over ``limit`` bytes (refused before reading it,
    and before a ``100 Continue``, when its Content-Length says so)."""
    length = request.content_length
    if length is not None and length > limit:
        return None
    if request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
        # curl asks before sending a body over 1 KiB, and waits a second for this answer.
        # Minor layering violation: this is aiohttp's own _default_expect_handler, which
        # its router runs and its low-level server does not.
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
    if length is not None:
        try:
            return await request.content.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            return exc.partial  # the client hung up; what came is parsed, and fails
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _response(answer: HttpResponse, extra: dict[str, str]) -> web.Response:
    """A :mod:`gateway.routes` answer as an aiohttp response (which sets Content-Length)."""
    headers = {"Content-Type": answer.content_type, "Cache-Control": answer.cache, **dict(answer.headers)}
    return web.Response(status=answer.status, body=answer.body, headers={**headers, **extra})


async def _streamed(
    request: web.BaseRequest, answer: HttpResponse, extra: dict[str, str]
) -> web.StreamResponse:
    """A :mod:`gateway.routes` answer whose body is a stream, sent as it is read (never
    whole in memory). A store that fails mid-way drops the connection: the client sees a
    body shorter than its Content-Length, never a wrong one."""
    assert answer.stream is not None
    headers = {"Content-Type": answer.content_type, "Cache-Control": answer.cache, **dict(answer.headers)}
    response = web.StreamResponse(status=answer.status, headers={**headers, **extra})
    response.content_length = answer.stream.length
    try:
        await response.prepare(request)
        if request.method == "GET":
            async for chunk in answer.stream.chunks:
                await response.write(chunk)
        await response.write_eof()
    except TaskError as exc:
        logger.warning("an image stopped arriving from the store mid-way: %s", exc.message)
        if request.transport is not None:
            request.transport.close()
    finally:
        await answer.stream.aclose()
    return response


def _not_allowed() -> HttpResponse:
    return HttpResponse(
        405,
        b"POST a JSON array of tasks here (or use the WebSocket port)\n",
        headers=(("Allow", "POST, OPTIONS"),),
    )


def _not_ready(task: Upscale) -> TaskError:
    return TaskError(
        "serviceUnavailable",
        "the model is not ready (loading or restarting); try again shortly",
        task_type=task.taskType,
        task_uuid=task.taskUUID,
    )


def _timed_out(slot: _Slot, timeout: float) -> TaskError:
    return TaskError(
        "timeout",
        f"the task did not finish within {timeout:g} s (--rest-timeout); it goes on: send the same "
        "request again to wait for it, or getResponse with its taskUUID",
        task_type=slot.task_type,
        task_uuid=slot.task_uuid,
    )


def _misplaced_authentication() -> TaskError:
    return TaskError(
        "invalidPayload",
        "an authentication task must come first in the array",
        parameter="taskType",
        type="string",
        task_type="authentication",
    )
