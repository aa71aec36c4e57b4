"""One handler per WebSocket: a receive loop that dispatches tasks in frame order, and
one writer task that drains a bounded send queue.

This is the only module that touches ``websockets.asyncio``. A client that stops
reading fills its queue (bounded in frames and bytes); it is then dropped, and what it
did not receive waits in its session for a resume. Nothing is lost: a frame that
cannot be sent goes back to the session.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from . import logs
from .config import is_loopback
from .errors import TaskError, internal_error
from .protocol import (
    Authentication,
    GetResponse,
    ImageUpload,
    Ping,
    Upscale,
    data_frame,
    error_frame,
    parse_frame,
)
from .session import Session

if TYPE_CHECKING:
    from .config import GatewayConfig
    from .delivery import Gateway

__all__ = ["AuthLimiter", "Connection", "key_accepted"]

logger = logging.getLogger(__name__)

_MAX_QUEUED_BYTES = 256 * 2**20
# Half of the high-water mark of websockets' default write_limit (32 KiB).
_NO_WAIT_BYTES = 16 * 2**10
_MAX_BATCH_FRAMES = 64
_PONG = data_frame({"taskType": "ping", "pong": True})
# runware-sdk (PyPI; User-Agent "runware-python/…") fails a sync task whose connection
# dropped ("connectionLost") and reports an error frame it cannot route as an error of
# *every* task it has in flight. A replayed error is for a task it already gave up on,
# so replaying it would fail unrelated tasks: such clients get missed results replayed,
# and missed errors only through getResponse.
_NO_ERROR_REPLAY_AGENTS = ("runware-python/",)


def _write_buffer_empty(ws) -> bool:
    transport = getattr(ws, "transport", None)  # stand-ins in tests may have none
    return transport is not None and transport.get_write_buffer_size() == 0


class AuthLimiter:
    """Failed authentications per peer address in a sliding minute."""

    def __init__(self, per_minute: int, clock=time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def blocked(self, peer: str) -> bool:
        window = self._failures.get(peer)
        if not window:
            return False
        now = self._clock()
        while window and now - window[0] > 60:
            window.popleft()
        if not window:
            del self._failures[peer]
        return len(window) >= self.per_minute

    def failed(self, peer: str) -> None:
        self._failures.setdefault(peer, deque()).append(self._clock())
        if len(self._failures) > 100_000:  # bound memory under a spray of addresses
            self._failures.pop(next(iter(self._failures)))


def key_accepted(config: GatewayConfig, key: str) -> bool:
    """Whether ``key`` is one of the configured API keys (any key on a loopback host
    configured with none). Every key is compared in constant time, without stopping early."""
    keys = config.api_keys
    if not keys:
        return is_loopback(config.host)
    matched = False
    for candidate in keys:
        matched |= hmac.compare_digest(candidate.encode(), key.encode())
    return matched


class Connection:
    def __init__(self, ws: ServerConnection, gateway: Gateway, limiter: AuthLimiter) -> None:
        self.ws = ws
        self.gateway = gateway
        self.config = gateway.config
        self.limiter = limiter
        self.peer = str(ws.remote_address[0]) if ws.remote_address else "?"
        request = getattr(ws, "request", None)  # the opening handshake (stand-ins have none)
        # get_all: a repeated header must not raise (Headers.get does).
        user_agent = " ".join(request.headers.get_all("User-Agent")) if request is not None else ""
        self.replays_errors = not any(agent in user_agent for agent in _NO_ERROR_REPLAY_AGENTS)
        self.session: Session | None = None
        self.api_key: str = ""
        self.in_flight = 0
        self.auth_failures = 0
        self._queue: deque[bytes] = deque()
        self._sending: list[bytes] = []  # taken off the queue, not yet fully sent
        self._soon: list[bytes] = []  # small frames to write together at the end of this loop turn
        self._soon_bytes = 0
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self._closed = False
        self._close_when_flushed: tuple[int, str] | None = None

    # Sending

    def send(self, frame: bytes, *, replay: bool = False, urgent: bool = False) -> bool:
        """Queue a frame; False if this connection can no longer take it (closed, or its
        reader is too slow, in which case it is dropped). A session's replay is queued
        whole (the session bounds it), so a resume never trips the slow-reader limit.
        An ``urgent`` frame (a pong) goes ahead of queued results: the JS SDK counts a
        pong later than 10 s as missed and reconnects, so pong latency beats order."""
        if self._closed or self._close_when_flushed is not None:
            return False
        too_many = len(self._queue) >= self.config.send_queue_frames and not replay
        if too_many or self._queued_bytes > _MAX_QUEUED_BYTES:
            logger.warning("dropping a client that does not read (%d frames queued)", len(self._queue))
            self._drop(1008, "client is not reading its results; resume the session to receive them")
            return False
        if not self._queue and not self._sending and self._write_soon(frame):
            return True
        if urgent:
            self._queue.appendleft(frame)
        else:
            self._queue.append(frame)
        self._queued_bytes += len(frame)
        self._wakeup.set()
        return True

    def _write_soon(self, frame: bytes) -> bool:
        """Take ``frame`` for a write at the end of this event-loop turn if that cannot
        block: nothing queued or being written (checked by the caller, so order holds),
        small frames and an empty socket buffer. The common case: no writer wake-up, and
        the results that finish in one turn leave in one ``transport.write`` (one system
        call) instead of one each.

        Minor layering violation: this is what websockets' ``send()`` does for a text
        frame when ``send_context()`` finds the connection open and no drain is needed.
        """
        if len(frame) > _NO_WAIT_BYTES:
            return False
        if self._soon_bytes + len(frame) > _NO_WAIT_BYTES:
            self._flush_soon()
        if not self._soon:  # (if the socket closes meanwhile, _flush_soon sees to it)
            if not _write_buffer_empty(self.ws) or self.ws.protocol.state is not State.OPEN:
                return False
            asyncio.get_running_loop().call_soon(self._flush_soon)
        self._soon.append(frame)
        self._soon_bytes += len(frame)
        return True

    def _flush_soon(self) -> None:
        frames, self._soon, self._soon_bytes = self._soon, [], 0
        if not frames:
            return
        ws = self.ws
        if ws.protocol.state is not State.OPEN or ws.transport.is_closing():
            # The socket is closing: the frames wait in the queue, and go back to the
            # session with everything else unsent when the handler sees the close.
            self._queue.extendleft(reversed(frames))
            self._queued_bytes += sum(map(len, frames))
            return
        for frame in frames:
            ws.protocol.send_text(frame)
        ws.transport.write(b"".join(ws.protocol.data_to_send()))

    async def _writer(self) -> None:
        while True:
            while not self._queue:
                if self._close_when_flushed is not None:
                    self._flush_soon()
                    self._closed = True
                    await self.ws.close(*self._close_when_flushed)
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            self._flush_soon()  # anything taken for this turn's write goes first
            # Taken off the queue before sending (so an urgent frame may go ahead of the
            # rest), but counted as unsent until the send completes: if it fails, they are
            # the first frames handed back to the session.
            batch = self._sending = self._take_batch()
            size = sum(map(len, batch))
            try:
                if size <= _NO_WAIT_BYTES and _write_buffer_empty(self.ws):
                    # Into an empty buffer, frames under the write limit's high-water mark
                    # cannot make the send wait for drain, so they need no timeout (whose
                    # set-up costs about as much as the send itself).
                    await self._write(batch)
                else:
                    async with asyncio.timeout(self.config.send_timeout):
                        await self._write(batch)
            except (ConnectionClosed, TimeoutError):
                self._drop(1008, "send timed out")
                return
            self._sending = []
            self._queued_bytes -= size

    def _take_batch(self) -> list[bytes]:
        """The next frame, with the small frames queued behind it when the socket can
        take them in one write (a real websockets connection, not a test stand-in)."""
        batch = [self._queue.popleft()]
        if not self._queue or not _write_buffer_empty(self.ws):
            return batch
        size = len(batch[0])
        while self._queue and len(batch) < _MAX_BATCH_FRAMES:
            size += len(self._queue[0])
            if size > _NO_WAIT_BYTES:
                break
            batch.append(self._queue.popleft())
        return batch

    async def _write(self, batch: list[bytes]) -> None:
        if len(batch) == 1:
            await self.ws.send(batch[0], text=True)
            return
        # Several frames in one transport.write, hence one system call: on loopback
        # and under load the call, not the framing, is the cost of a small result.
        # Minor layering violation: this is websockets' own send() for a text frame,
        # with send_context()'s per-frame writes joined into one.
        async with self.ws.send_context():
            for frame in batch:
                self.ws.protocol.send_text(frame)
            self.ws.transport.write(b"".join(self.ws.protocol.data_to_send()))

    def _drop(self, code: int, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self._return_unsent()
        self.gateway.spawn(self.ws.close(code, reason))

    def _close_after_flush(self, code: int, reason: str) -> None:
        """Close once what is queued (an error explaining why, say) has been sent."""
        self._close_when_flushed = (code, reason)
        self._wakeup.set()

    def _return_unsent(self) -> None:
        """Frames that never left go back to the session, in order."""
        if self.session is not None:
            for frame in [*self._soon, *self._sending, *self._queue]:
                if frame is not _PONG:  # a pong is for this socket only
                    self.gateway.state.keep(self.session, frame)
        self._soon, self._soon_bytes = [], 0
        self._sending = []
        self._queue.clear()
        self._queued_bytes = 0

    # Receiving

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        writer = asyncio.create_task(self._writer())
        # Idle close: one timer that re-arms itself from the time of the last frame,
        # rather than a timeout set up and torn down around every recv().
        self._last_frame_at = loop.time()
        self._idle_timer = loop.call_at(self._last_frame_at + self.config.idle_timeout, self._check_idle)
        try:
            while not self._closed:
                message = await self.ws.recv()
                self._last_frame_at = loop.time()
                await self.handle(message)
        except ConnectionClosed:
            pass
        finally:
            self._closed = True
            self._idle_timer.cancel()
            writer.cancel()
            self._return_unsent()
            if self.session is not None:
                await self.gateway.state.detach(self.session, self)

    def _check_idle(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = self._last_frame_at + self.config.idle_timeout
        if loop.time() < deadline:
            self._idle_timer = loop.call_at(deadline, self._check_idle)
        elif not self._closed:
            # recv() then raises ConnectionClosed and run() ends as for any other close.
            self.gateway.spawn(self.ws.close(1000, "idle timeout"))

    async def handle(self, message: str | bytes) -> None:
        """Answer one frame: each task on its own, in order."""
        parsed = parse_frame(message, max_tasks=self.config.max_tasks_per_frame)
        if isinstance(parsed, TaskError):
            self.send(error_frame(parsed))
            return
        for task in parsed:
            # Log lines about this task (and of what it spawns) carry its taskUUID.
            context = logs.TASK_UUID.set(getattr(task, "taskUUID", None))
            try:
                await self._dispatch(task)
            except Exception:
                logger.exception("handling a task failed")
                task_type = getattr(task, "taskType", None)
                self.send(error_frame(internal_error(task_type, getattr(task, "taskUUID", None))))
            finally:
                logs.TASK_UUID.reset(context)
            if self._closed:
                return

    async def _dispatch(self, task) -> None:
        if isinstance(task, TaskError):
            self.send(error_frame(task))
        elif isinstance(task, Ping):
            self.send(_PONG, urgent=True)
        elif isinstance(task, Authentication):
            await self._authenticate(task)
        elif self.session is None:
            task_type = task.taskType
            self.send(
                error_frame(
                    TaskError(
                        "notAuthenticated",
                        'authenticate first: send [{"taskType":"authentication","apiKey":"…"}]',
                        task_type=task_type,
                        task_uuid=task.taskUUID,
                    )
                )
            )
        elif isinstance(task, Upscale):
            await self.gateway.submit_upscale(self, task)
        elif isinstance(task, ImageUpload):
            self.gateway.submit_upload(self, task)
        elif isinstance(task, GetResponse):
            await self.gateway.get_response(self, task)

    # Authentication

    async def _authenticate(self, task: Authentication) -> None:
        if self.limiter.blocked(self.peer):
            self._refuse(
                "rateLimitExceeded", "too many failed authentications from this address; wait a minute"
            )
            self._close_after_flush(1008, "too many failed authentications")
            return
        if not task.apiKey:
            self._fail_auth("missingApiKey", "apiKey is required")
            return
        if not key_accepted(self.config, task.apiKey):
            self._fail_auth("invalidApiKey", "the API key is not valid")
            return
        if self.session is not None:
            await self.gateway.state.detach(self.session, self)
            self.session = None
        session, replay = await self.gateway.state.open(task.apiKey, task.connectionSessionUUID, self)
        self.session, self.api_key = session, task.apiKey
        logs.SESSION.set(session.session_id)  # on this connection's log lines from now on
        self.send(data_frame({"taskType": "authentication", "connectionSessionUUID": session.session_id}))
        for frame in replay:
            if not self.replays_errors and frame.startswith(b'{"errors"'):
                continue  # see _NO_ERROR_REPLAY_AGENTS; the task record keeps the error
            if not self.send(frame, replay=True):
                self.gateway.state.keep(session, frame)

    def _fail_auth(self, code: str, message: str) -> None:
        self.auth_failures += 1
        self.limiter.failed(self.peer)
        self._refuse(code, message)
        if self.auth_failures >= self.config.max_auth_failures:
            self._close_after_flush(1008, "too many failed authentications")

    def _refuse(self, code: str, message: str) -> None:
        self.send(
            error_frame(
                TaskError(code, message, parameter="apiKey", type="string", task_type="authentication")
            )
        )
