"""``BatchClient``: stream jobs through one WebSocket to a gateway, each result written once.

    async def endpoint():    # called once, when the first input needs sending
        return "ws://127.0.0.1:8787/v1", api_key

    client = BatchClient(endpoint, TaskSettings(steps=20), report=print, concurrency=32)
    await client.run(jobs)   # any iterable of Job | Unusable, consumed lazily
    client.stop()            # e.g. from a SIGINT handler: send nothing more, finish what was sent

Every job gets exactly one :class:`Outcome` (``ok``, ``failed`` or ``skipped``), passed to
``report`` as it happens; jobs never sent because of :meth:`stop` get none.

How it keeps its promises:

- **Flat memory.** A daemon thread (:class:`_Feeder`) walks the inputs and reads each file
  a few jobs ahead of the sender; at most ``concurrency`` jobs are *open* (read, sent, or
  being written) at a time, and a sent job keeps no image bytes (a retry reads the file
  again). Results are written as they arrive.
- **Exactly once.** A sent job is in ``_in_flight`` under its ``taskUUID`` until its first
  terminal item takes it out; any later copy of that item (a replay and a getResponse
  answer for the same task) finds nothing and is ignored.
- **Resume.** A dropped connection is reopened with the session's
  ``connectionSessionUUID``, so the server replays the results it could not deliver. Tasks
  sent on an earlier connection are then asked for with ``getResponse`` (every
  :data:`POLL_INTERVAL` seconds until they end: an expired session's results are not
  pushed to its successor): ``invalidTaskUUID`` means the server never got the task, so it
  is sent again under a new ``taskUUID``.
- **Backpressure.** ``rateLimitExceeded`` (and ``taskAborted``, a server shutting down)
  sends the task again after a growing delay. A server that closes the connection
  because a frame was too big (1009) gets smaller frames from then on, and an input
  that alone is too big for it fails instead of looping.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.frames import CloseCode

from . import files
from .inputs import Job, Unusable

__all__ = ["AuthRejected", "BatchClient", "ConnectFailed", "Outcome", "TaskSettings"]

logger = logging.getLogger(__name__)

USER_AGENT = "latent-upscaler-cli/0.1"
POLL_INTERVAL = 2.0  # seconds between getResponse rounds for tasks sent on an earlier connection
PING_INTERVAL = 30.0  # a ping task keeps the server's idle timer (120 s by default) from closing us
RECONNECT_FOR = 120.0  # give up after this long without a connection (the server's session TTL)
# Answers that say "not now" rather than "not this": the task is sent again after a
# growing delay (a full engine queue; a task cut short by a server shutting down).
RETRIED_CODES = frozenset({"rateLimitExceeded", "taskAborted"})
MAX_RETRIES = 20
FRAME_TASKS = 64  # tasks per frame (the server takes up to 256)
FRAME_BYTES = 4 * 2**20  # base64 per frame before it is sent (the server takes 32 MiB)
MAX_FRAME = 32 * 2**20  # the gateway's default frame limit (a server with less says so: 1009)
FRAME_OVERHEAD = 4096  # a task's JSON besides its image
LOOKAHEAD = 256  # input paths listed ahead of the sender
INLINE_WRITE_BYTES = 1 * 2**20  # base64 results up to this are decoded and written on the event loop
MAX_RESULT_FRAME = 256 * 2**20  # a getResponse answer carries a base64 output whole
_CONNECT_ERRORS = (OSError, InvalidHandshake, TimeoutError, ConnectionClosed)


class ConnectFailed(Exception):
    """The server could not be reached (at the start, or for RECONNECT_FOR seconds)."""


class AuthRejected(Exception):
    """The server refused the API key."""


@dataclass(frozen=True)
class TaskSettings:
    """What every task asks for; ``None`` leaves a field to the server's default."""

    quality: int | None = None
    steps: int | None = None
    cfg: float | None = None
    seed: int | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    ttl: int = 600  # seconds the server keeps an output (enough to fetch it or resume)

    def task(self, task_uuid: str, prepared: files.Prepared) -> dict:
        settings: dict = {}
        for key, value in (
            ("steps", self.steps),
            ("CFGScale", self.cfg),
            ("seed", self.seed),
            ("positivePrompt", self.prompt),
            ("negativePrompt", self.negative_prompt),
        ):
            if value is not None:
                settings[key] = value
        task = {
            "taskType": "upscale",
            "taskUUID": task_uuid,
            "inputImage": prepared.image_base64,
            "upscaleFactor": 2,
            "outputType": prepared.output_type,
            "outputFormat": prepared.job.output_format,
            "includeCost": True,
            "ttl": self.ttl,
            "settings": settings,
        }
        if self.quality is not None:
            task["outputQuality"] = self.quality
        return task


@dataclass(slots=True)
class Outcome:
    """How one input ended. ``output`` is None when nothing was (or will be) written."""

    source: Path
    output: Path | None
    status: str  # "ok", "failed" or "skipped"
    code: str | None = None  # failed: the error code (the server's, or a local one)
    message: str | None = None  # failed: why; skipped: why
    seed: int | None = None
    cost: float | None = None
    seconds: float | None = None  # first send → written
    task_uuid: str | None = None

    def to_json(self) -> dict:
        line: dict = {"input": str(self.source), "output": str(self.output) if self.output else None}
        line["status"] = self.status
        if self.status == "ok":
            line.update(seed=self.seed, seconds=self.seconds, cost=self.cost, taskUUID=self.task_uuid)
        elif self.status == "failed":
            line["error"] = {"code": self.code, "message": self.message}
            if self.task_uuid:
                line["taskUUID"] = self.task_uuid
        else:
            line["reason"] = self.message
        return line


@dataclass(slots=True, eq=False)
class _Open:
    """A job from the moment it is read until its outcome."""

    job: Job
    task_uuid: str = ""
    epoch: int = -1  # the connection it was last sent on
    first_sent: float = 0.0
    retried: int = 0  # times the server answered one of RETRIED_CODES


@dataclass(slots=True)
class _Stats:
    frames_sent: int = 0
    resends: int = 0  # tasks sent again (never received by the server, or rate-limited)
    duplicates: int = 0  # terminal items for tasks already ended (ignored)
    reconnects: int = 0
    polls: int = 0
    by_code: dict[str, int] = field(default_factory=dict)


_END = object()


class BatchClient:
    def __init__(
        self,
        endpoint: Callable[[], Awaitable[tuple[str, str]]],
        settings: TaskSettings,
        *,
        report: Callable[[Outcome], None],
        concurrency: int = 32,
        overwrite: bool = False,
        fail_fast: bool = False,
        reconnect_for: float = RECONNECT_FOR,
    ) -> None:
        self.endpoint = endpoint
        self.url = self.api_key = ""
        self.started_at: float | None = None  # when the first connection was made
        self.settings = settings
        self.report = report
        self.concurrency = concurrency
        self.overwrite = overwrite
        self.fail_fast = fail_fast
        self.reconnect_for = reconnect_for
        self.stats = _Stats()
        self.stopping = False
        self.fatal: str | None = None  # why the run ended early (the connection could not be restored)
        self.session_id: str | None = None
        self._ws: ClientConnection | None = None
        self._epoch = 0
        self._connected = asyncio.Event()
        self._outbox: deque[tuple[_Open, files.Prepared]] = deque()
        self._outbox_ready = asyncio.Event()
        self._in_flight: dict[str, _Open] = {}
        self._open = 0
        self._open_outputs: set[Path] = set()  # outputs of open jobs: two inputs never race to one file
        self._room = asyncio.Event()  # set when an open job closes
        self._intake_done = False
        self._done = asyncio.Event()
        self._jobs: set[asyncio.Task] = set()
        self._http = None  # an httpx.AsyncClient, made on the first imageURL to fetch
        self._frame_limit = MAX_FRAME  # lowered if the server refuses a frame as too big
        self._largest_frame = (0, 0)  # (bytes, tasks) of the largest frame on this connection
        self._refused_frame = 0  # bytes of the last frame the server refused as too big

    # Running

    async def run(self, items: Iterable[Job | Unusable]) -> None:
        """Send every job of ``items`` and write its result; returns when each has its
        outcome (or after :meth:`stop`, when what was sent has). ``endpoint`` is called
        when the first input needs sending, not before: a rerun whose outputs all exist
        never starts (or reaches) a server. Raises :class:`ConnectFailed` or
        :class:`AuthRejected` if the first connection fails."""
        feeder = _Feeder(items, asyncio.get_running_loop())
        try:
            first = await self._first_to_send(feeder)
            if first is None:
                return
            self.url, self.api_key = await self.endpoint()
            self._ws = await self._open_connection()
            self.started_at = time.monotonic()
            self._connected.set()
            self._admit(first)
            await self._run_loops(feeder)
        finally:
            feeder.stop()
            logger.info("stream: %s", self.stats)
            if self._http is not None:
                await self._http.aclose()
            if self._ws is not None:
                await self._ws.close()

    async def _run_loops(self, feeder: _Feeder) -> None:
        loops = [
            asyncio.create_task(self._intake(feeder), name="intake"),
            asyncio.create_task(self._send_loop(), name="send"),
            asyncio.create_task(self._receive_loop(), name="receive"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
        ]
        for task in loops:
            task.add_done_callback(self._loop_ended)
        try:
            await self._done.wait()
        except asyncio.CancelledError:  # quit now: results being fetched or written are dropped
            for job in self._jobs:
                job.cancel()
            raise
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, *self._jobs, return_exceptions=True)

    def _loop_ended(self, task: asyncio.Task) -> None:
        """A loop that dies of a bug ends the run (its jobs fail) instead of hanging it."""
        if not task.cancelled() and task.exception() is not None:
            logger.error("the %s loop failed", task.get_name(), exc_info=task.exception())
            self._fail_run(f"internal error in the {task.get_name()} loop: {task.exception()!r}")

    def stop(self) -> None:
        """Send no more tasks; the run ends when those already sent have their outcome."""
        if self.stopping:
            return
        self.stopping = True
        while self._outbox:  # read but not sent: not started, no outcome (a rerun does them)
            self._close(self._outbox.popleft()[0])
        self._check_done()

    def _fail_run(self, reason: str) -> None:
        """The connection is gone for good: every open job fails with ``reason``."""
        self.fatal = reason
        self.stopping = True
        for open_ in list(self._in_flight.values()):
            self._fail(open_, "connectionLost", reason)
        self._in_flight.clear()
        while self._outbox:
            self._close(self._outbox.popleft()[0])
        self._done.set()

    def _check_done(self) -> None:
        if (self._intake_done or self.stopping) and self._open == 0:
            self._done.set()

    # Jobs in, frames out

    def _read(self, item: Job | Unusable) -> files.Prepared | Outcome:
        """Skip, refuse or read one input. On the event loop: a small file's few system
        calls cost less than handing them to a thread, whose every call would then
        contend with the loop for the GIL."""
        if isinstance(item, Unusable):
            return Outcome(item.source, None, "failed", item.code, item.message)
        if not self.overwrite and item.output.exists():
            return Outcome(item.source, item.output, "skipped", message="output exists")
        try:
            return files.prepare(item)
        except files.InputError as exc:
            return Outcome(item.source, None, "failed", exc.code, str(exc))

    async def _first_to_send(self, feeder: _Feeder) -> files.Prepared | None:
        """Report the inputs that need no server (skipped, unusable) up to the first that
        does; None if there is none, or the run was stopped."""
        while not self.stopping:
            item = await feeder.get()
            if item is _END:
                return None
            item = self._read(item)
            if isinstance(item, files.Prepared):
                return item
            self._emit(item)
        return None

    async def _intake(self, feeder: _Feeder) -> None:
        while not self.stopping:
            while self._open >= self.concurrency:
                self._room.clear()
                await self._room.wait()
            item = await feeder.get()
            if item is _END or self.stopping:
                break
            self._admit(self._read(item))
        self._intake_done = True
        self._check_done()

    def _admit(self, item: files.Prepared | Outcome) -> None:
        """Open a read job (the caller made sure there is room for one), or report."""
        if isinstance(item, Outcome):
            self._emit(item)
            return
        job = item.job
        if job.output in self._open_outputs:
            message = f"another input of this run is being written to {job.output}"
            self._emit(Outcome(job.source, None, "failed", "outputConflict", message))
            return
        self._open += 1
        self._open_outputs.add(job.output)
        self._queue(_Open(job), item)

    def _queue(self, open_: _Open, prepared: files.Prepared) -> None:
        self._outbox.append((open_, prepared))
        self._outbox_ready.set()

    async def _send_loop(self) -> None:
        while True:
            while not self._outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
            await self._connected.wait()
            ws, epoch = self._ws, self._epoch
            frame, count = self._next_frame(epoch)
            if not count:
                continue
            if len(frame) > self._largest_frame[0]:
                self._largest_frame = (len(frame), count)
            # A send that fails leaves its tasks in flight on a dead connection: after the
            # reconnect, getResponse finds out whether the server got them.
            with contextlib.suppress(ConnectionClosed):
                await ws.send(frame, text=True)
                self.stats.frames_sent += 1

    def _next_frame(self, epoch: int) -> tuple[bytes, int]:
        """The next frame of tasks from the outbox (within the frame budget, or one task
        alone), registered in flight on connection ``epoch``; and how many it holds."""
        tasks, size, now = [], 0, time.monotonic()
        largest = self._frame_limit - FRAME_OVERHEAD
        budget = min(FRAME_BYTES, largest)
        while self._outbox and len(tasks) < FRAME_TASKS:
            open_, prepared = self._outbox[0]
            if tasks and size + len(prepared.image_base64) > budget:
                break
            self._outbox.popleft()
            if len(prepared.image_base64) > largest:
                message = (
                    f"too large for this server's frames (it refused a frame of {self._refused_frame} bytes)"
                )
                self._fail(open_, "inputTooLarge", message)
                continue
            open_.task_uuid, open_.epoch = str(uuid.uuid4()), epoch
            open_.first_sent = open_.first_sent or now
            self._in_flight[open_.task_uuid] = open_
            tasks.append(self.settings.task(open_.task_uuid, prepared))
            size += len(prepared.image_base64)
        return orjson.dumps(tasks), len(tasks)

    async def _send_control(self, tasks: list[dict]) -> None:
        ws = self._ws
        if ws is None or not self._connected.is_set():
            return
        with contextlib.suppress(ConnectionClosed):
            await ws.send(orjson.dumps(tasks), text=True)

    async def _heartbeat(self) -> None:
        last_ping = time.monotonic()
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            orphans = [u for u, o in self._in_flight.items() if o.epoch < self._epoch]
            if orphans:
                await self._poll(orphans)
            if time.monotonic() - last_ping >= PING_INTERVAL:
                last_ping = time.monotonic()
                await self._send_control([{"taskType": "ping", "ping": True}])

    async def _poll(self, task_uuids: list[str]) -> None:
        self.stats.polls += len(task_uuids)
        for start in range(0, len(task_uuids), FRAME_TASKS):
            chunk = task_uuids[start : start + FRAME_TASKS]
            await self._send_control([{"taskType": "getResponse", "taskUUID": u} for u in chunk])

    # Connection

    async def _open_connection(self) -> ClientConnection:
        """Connect and authenticate (resuming the session if there is one)."""
        try:
            ws = await connect(
                self.url,
                max_size=MAX_RESULT_FRAME,
                compression=None,
                open_timeout=10,
                ping_interval=20,
                ping_timeout=20,
                close_timeout=5,
                user_agent_header=USER_AGENT,
            )
        except InvalidURI as exc:
            raise ConnectFailed(f"{self.url} is not a WebSocket URL (ws://HOST:PORT/v1): {exc}") from exc
        except _CONNECT_ERRORS as exc:
            raise ConnectFailed(f"cannot connect to {self.url}: {exc}") from exc
        auth: dict = {"taskType": "authentication", "apiKey": self.api_key}
        if self.session_id:
            auth["connectionSessionUUID"] = self.session_id
        try:
            await ws.send(orjson.dumps([auth]), text=True)
            async with asyncio.timeout(30):
                self.session_id = await self._authenticated(ws)
        except AuthRejected:
            await ws.close()
            raise
        except _CONNECT_ERRORS as exc:
            await ws.close()
            raise ConnectFailed(f"{self.url} did not answer the authentication: {exc}") from exc
        return ws

    @staticmethod
    async def _authenticated(ws: ClientConnection) -> str:
        while True:
            frame = orjson.loads(await ws.recv())
            for item in frame.get("data") or ():
                if item.get("taskType") == "authentication":
                    return item["connectionSessionUUID"]
            for error in frame.get("errors") or ():
                if error.get("taskType") == "authentication":
                    raise AuthRejected(f"{error.get('code')}: {error.get('message')}")

    async def _receive_loop(self) -> None:
        while True:
            ws = self._ws
            assert ws is not None
            try:
                async for message in ws:
                    self._on_frame(message)
            except ConnectionClosed:
                pass
            if self._done.is_set():
                return
            self._connected.clear()
            if _refused_as_too_big(ws):
                # A refused frame of one task: that task is too big (it fails when next
                # sent). Of several: halve, so that this converges in a few round trips.
                size, count = self._largest_frame
                self._refused_frame = size
                self._frame_limit = min(self._frame_limit, size - 1 if count == 1 else size // 2)
                logger.warning(
                    "the server refused a frame as too big: frames stay under %d bytes", self._frame_limit
                )
            self._largest_frame = (0, 0)
            await self._reconnect(ws)
            if self.fatal:
                return

    async def _reconnect(self, old: ClientConnection) -> None:
        logger.warning(
            "connection lost (%s); resuming", old.close_reason or old.close_code or "no close frame"
        )
        self.stats.reconnects += 1
        deadline = time.monotonic() + self.reconnect_for
        # Jittered backoff from a random first delay (as websockets' own client does), so
        # the clients of a restarted server do not all come back at the same instant.
        delay = random.uniform(0.05, 0.25)
        session = self.session_id
        while True:
            await asyncio.sleep(delay)
            try:
                ws = await self._open_connection()
                break
            except AuthRejected as exc:
                self._fail_run(f"the server refused the API key on reconnecting: {exc}")
                return
            except ConnectFailed as exc:
                if time.monotonic() + delay > deadline:
                    self._fail_run(
                        f"lost the connection and could not restore it in {self.reconnect_for:.0f} s: {exc}"
                    )
                    return
                delay = min(delay * 1.618, 5.0)
                logger.warning("%s; retrying in %.1f s", exc, delay)
        if self.session_id != session:
            logger.warning(
                "the server did not resume the session (expired?): asking for results with getResponse"
            )
        self._ws, self._epoch = ws, self._epoch + 1
        self._connected.set()
        orphans = list(self._in_flight)  # every one was sent on an earlier connection
        if orphans:
            await self._poll(orphans)

    # Frames in

    def _on_frame(self, message: str | bytes) -> None:
        try:
            frame = orjson.loads(message)
        except orjson.JSONDecodeError:
            logger.warning("ignoring a frame that is not JSON")
            return
        if not isinstance(frame, dict):
            return
        for item in frame.get("data") or ():
            if isinstance(item, dict):
                self._on_item(item)
        for error in frame.get("errors") or ():
            if isinstance(error, dict):
                self._on_error(error)

    def _on_item(self, item: dict) -> None:
        task_uuid = item.get("taskUUID")
        if task_uuid is None or item.get("status") != "success":
            return  # pong, progress, or a getResponse answer "processing"
        open_ = self._in_flight.pop(task_uuid, None)
        if open_ is None:
            self.stats.duplicates += 1
            return
        inline = item.get("imageBase64Data") or item.get("imageDataURI") or ""
        if "imageURL" not in item and len(inline) <= INLINE_WRITE_BYTES:
            # Small: written here and now (a thread hop would cost more than the write).
            self._close(open_, self._write(open_, item, _write_inline, open_.job.output, item))
        else:
            self._spawn(self._complete(open_, item))

    def _on_error(self, error: dict) -> None:
        task_uuid, code = error.get("taskUUID"), str(error.get("code"))
        message = str(error.get("message"))
        open_ = self._in_flight.get(task_uuid) if task_uuid else None
        if open_ is None:
            if task_uuid is None:
                logger.warning("the server reported %s: %s", code, message)
            return
        self.stats.by_code[code] = self.stats.by_code.get(code, 0) + 1
        if code == "invalidTaskUUID" and error.get("taskType") == "getResponse":
            # The server never got this task (its frame was lost with the connection).
            del self._in_flight[task_uuid]
            self._spawn(self._resend(open_))
        elif code == "conflictTaskUUID":
            open_.epoch = -1  # known to the server after all: getResponse will tell
        elif code in RETRIED_CODES and open_.retried < MAX_RETRIES:
            del self._in_flight[task_uuid]
            open_.retried += 1
            self._spawn(self._resend(open_, delay=min(5.0, 0.1 * 2**open_.retried)))
        else:
            del self._in_flight[task_uuid]
            self._fail(open_, code, message)

    async def _resend(self, open_: _Open, delay: float = 0.0) -> None:
        self.stats.resends += 1
        if delay:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        if self.stopping:
            self._close(open_)
            return
        try:
            prepared = files.prepare(open_.job)
        except files.InputError as exc:
            self._fail(open_, exc.code, str(exc))
            return
        self._queue(open_, prepared)

    # Results

    async def _complete(self, open_: _Open, item: dict) -> None:
        """Fetch (imageURL) or decode a large result and write it, off the event loop."""
        job = open_.job
        try:
            if "imageURL" in item:
                data = await self._fetch(item["imageURL"])
                outcome = await asyncio.to_thread(
                    self._write, open_, item, files.write_atomic, job.output, data
                )
            else:
                outcome = await asyncio.to_thread(self._write, open_, item, _write_inline, job.output, item)
        except _ResultError as exc:
            outcome = self._failure(open_, exc.code, str(exc))
        self._close(open_, outcome)

    def _write(self, open_: _Open, item: dict, write: Callable, *args) -> Outcome:
        """``write(*args)`` a job's result; its outcome (thread-safe: reports nothing)."""
        job = open_.job
        try:
            write(*args)
        except _ResultError as exc:
            return self._failure(open_, exc.code, str(exc))
        except OSError as exc:
            return self._failure(open_, "writeFailed", f"cannot write {job.output}: {exc.strerror or exc}")
        seconds = round(time.monotonic() - open_.first_sent, 3)
        return Outcome(
            job.source,
            job.output,
            "ok",
            seed=item.get("seed"),
            cost=item.get("cost"),
            seconds=seconds,
            task_uuid=open_.task_uuid,
        )

    async def _fetch(self, image_url: str) -> bytes:
        import httpx  # only runs that get large outputs need it: imported then, not at start-up

        if self._http is None:
            limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
            self._http = httpx.AsyncClient(timeout=60.0, limits=limits)
        url = _reachable(image_url, self.url)
        error: Exception | None = None
        for attempt in range(3):
            try:
                response = await self._http.get(url)
            except httpx.HTTPError as exc:
                error = exc
            else:
                if response.status_code == 200:
                    return response.content
                if response.status_code == 404:
                    raise _ResultError("fetchFailed", f"{url}: 404 (the image expired on the server)")
                error = _ResultError("fetchFailed", f"{url}: HTTP {response.status_code}")
            await asyncio.sleep(0.5 * 2**attempt)
        raise _ResultError("fetchFailed", f"could not fetch {url}: {error}")

    # Outcomes

    def _fail(self, open_: _Open, code: str, message: str) -> None:
        self._close(open_, self._failure(open_, code, message))

    @staticmethod
    def _failure(open_: _Open, code: str, message: str) -> Outcome:
        return Outcome(open_.job.source, None, "failed", code, message, task_uuid=open_.task_uuid or None)

    def _close(self, open_: _Open, outcome: Outcome | None = None) -> None:
        """The end of an open job: free its slot, report its outcome (if it has one)."""
        self._open -= 1
        self._open_outputs.discard(open_.job.output)
        self._room.set()
        if outcome is not None:
            self._emit(outcome)
        self._check_done()

    def _emit(self, outcome: Outcome) -> None:
        self.report(outcome)
        if outcome.status == "failed" and self.fail_fast:
            self.stop()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)


class _ResultError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _refused_as_too_big(ws: ClientConnection) -> bool:
    """Whether the server closed the connection (1009) because a frame was too big."""
    protocol = ws.protocol
    rcvd = protocol.close_rcvd
    return rcvd is not None and rcvd.code == CloseCode.MESSAGE_TOO_BIG and bool(protocol.close_rcvd_then_sent)


def _write_inline(path: Path, item: dict) -> None:
    """Decode a base64Data / dataURI result and write it (on a worker thread)."""
    encoded = item.get("imageBase64Data")
    if encoded is None and "imageDataURI" in item:
        encoded = item["imageDataURI"].partition(",")[2]
    if not encoded:
        raise _ResultError("missingResult", "the result carries no image (it may have expired on the server)")
    files.write_atomic(path, base64.b64decode(encoded))


def _reachable(image_url: str, ws_url: str) -> str:
    """A server listening on every interface (``--host 0.0.0.0``) without a ``--public-url``
    names that wildcard in its image URLs: fetch from the host the WebSocket reached."""
    parts = urlsplit(image_url)
    if parts.hostname not in ("0.0.0.0", "::"):
        return image_url
    host = urlsplit(ws_url).hostname or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


class _Feeder:
    """Runs the input stream (folder walks, stdin) on a daemon thread, at most LOOKAHEAD
    items ahead of :meth:`get`. Daemon, so a read blocked on stdin never keeps the process
    alive.

    The two sides wake each other rarely (each wake-up is a system call or two): the
    thread, once the buffer is full, sleeps until it has drained to half; the event loop
    is woken only when it found the buffer empty and waits."""

    def __init__(self, items: Iterable, loop: asyncio.AbstractEventLoop) -> None:
        self._items: deque = deque()
        self._lock = threading.Condition()
        self._waiting = False  # the event loop waits for an item
        self._ready = asyncio.Event()
        self._loop = loop
        self._stopped = False
        self._thread = threading.Thread(target=self._run, args=(items,), name="inputs", daemon=True)
        self._thread.start()

    async def get(self):
        """The next item (a Job, an Unusable, or _END); returns without suspending when
        one is buffered."""
        while True:
            with self._lock:
                if self._items:
                    item = self._items.popleft()
                    if len(self._items) <= LOOKAHEAD // 2:
                        self._lock.notify()
                    return item
                self._waiting = True
                self._ready.clear()
            await self._ready.wait()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()

    def _run(self, items: Iterable) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except Exception as exc:  # a bug or an unreadable stdin: end the stream, say why
            logger.error("reading the inputs failed: %s", exc, exc_info=exc)
        self._put(_END)

    def _put(self, item) -> bool:
        with self._lock:
            while not self._stopped and len(self._items) >= LOOKAHEAD:
                self._lock.wait()
            if self._stopped:
                return False
            self._items.append(item)
            wake, self._waiting = self._waiting, False
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the loop is gone
                return False
        return True
