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

from .config import is_loopback
from .errors import TaskError
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
    from .delivery import Gateway

__all__ = ["AuthLimiter", "Connection"]

logger = logging.getLogger(__name__)

_MAX_QUEUED_BYTES = 256 * 2**20


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


class Connection:
    def __init__(self, ws: ServerConnection, gateway: Gateway, limiter: AuthLimiter) -> None:
        self.ws = ws
        self.gateway = gateway
        self.config = gateway.config
        self.limiter = limiter
        self.peer = str(ws.remote_address[0]) if ws.remote_address else "?"
        self.session: Session | None = None
        self.api_key: str = ""
        self.in_flight = 0
        self.auth_failures = 0
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self._closed = False
        self._close_when_flushed: tuple[int, str] | None = None

    # Sending

    def send(self, frame: bytes, *, replay: bool = False) -> bool:
        """Queue a frame; False if this connection can no longer take it (closed, or its
        reader is too slow, in which case it is dropped). A session's replay is queued
        whole (the session bounds it), so a resume never trips the slow-reader limit."""
        if self._closed or self._close_when_flushed is not None:
            return False
        too_many = len(self._queue) >= self.config.send_queue_frames and not replay
        if too_many or self._queued_bytes > _MAX_QUEUED_BYTES:
            logger.warning("dropping a client that does not read (%d frames queued)", len(self._queue))
            self._drop(1008, "client is not reading its results; resume the session to receive them")
            return False
        self._queue.append(frame)
        self._queued_bytes += len(frame)
        self._wakeup.set()
        return True

    async def _writer(self) -> None:
        while True:
            while not self._queue:
                if self._close_when_flushed is not None:
                    self._closed = True
                    await self.ws.close(*self._close_when_flushed)
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            frame = self._queue[0]
            try:
                async with asyncio.timeout(self.config.send_timeout):
                    await self.ws.send(frame, text=True)
            except (ConnectionClosed, TimeoutError):
                self._drop(1008, "send timed out")
                return
            self._queue.popleft()
            self._queued_bytes -= len(frame)

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
            for frame in self._queue:
                self.gateway.sessions.keep(self.session, frame)
        self._queue.clear()
        self._queued_bytes = 0

    # Receiving

    async def run(self) -> None:
        writer = asyncio.create_task(self._writer())
        try:
            while not self._closed:
                try:
                    async with asyncio.timeout(self.config.idle_timeout):
                        message = await self.ws.recv()
                except TimeoutError:
                    await self.ws.close(1000, "idle timeout")
                    break
                self.handle(message)
        except ConnectionClosed:
            pass
        finally:
            self._closed = True
            writer.cancel()
            self._return_unsent()
            if self.session is not None:
                self.gateway.detach(self.session, self)

    def handle(self, message: str | bytes) -> None:
        """Answer one frame: each task on its own, in order."""
        parsed = parse_frame(message, max_tasks=self.config.max_tasks_per_frame)
        if isinstance(parsed, TaskError):
            self.send(error_frame(parsed))
            return
        for task in parsed:
            try:
                self._dispatch(task)
            except Exception:
                logger.exception("handling a task failed")
                uuid_ = getattr(task, "taskUUID", None)
                self.send(error_frame(TaskError("internalError", "internal server error", task_uuid=uuid_)))
            if self._closed:
                return

    def _dispatch(self, task) -> None:
        if isinstance(task, TaskError):
            self.send(error_frame(task))
        elif isinstance(task, Ping):
            self.send(data_frame({"taskType": "ping", "pong": True}))
        elif isinstance(task, Authentication):
            self._authenticate(task)
        elif self.session is None:
            task_type = "imageUpscale" if isinstance(task, Upscale) else task.taskType
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
            self.gateway.submit_upscale(self, task)
        elif isinstance(task, ImageUpload):
            self.gateway.spawn(self.gateway.upload(self, task))
        elif isinstance(task, GetResponse):
            self.gateway.get_response(self, task)

    # Authentication

    def _authenticate(self, task: Authentication) -> None:
        if self.limiter.blocked(self.peer):
            self._refuse(
                "rateLimitExceeded", "too many failed authentications from this address; wait a minute"
            )
            self._close_after_flush(1008, "too many failed authentications")
            return
        if not task.apiKey:
            self._fail_auth("missingApiKey", "apiKey is required")
            return
        if not self._key_accepted(task.apiKey):
            self._fail_auth("invalidApiKey", "the API key is not valid")
            return
        if self.session is not None:
            self.gateway.detach(self.session, self)
        session, replay = self.gateway.sessions.open(task.apiKey, task.connectionSessionUUID)
        self.session, self.api_key = session, task.apiKey
        self.gateway.attach(session, self)
        self.send(data_frame({"taskType": "authentication", "connectionSessionUUID": session.session_id}))
        for frame in replay:
            if not self.send(frame, replay=True):
                self.gateway.sessions.keep(session, frame)

    def _key_accepted(self, key: str) -> bool:
        keys = self.config.api_keys
        if not keys:
            return is_loopback(self.config.host)
        # Compare against every key, in constant time per key, without stopping early.
        matched = False
        for candidate in keys:
            matched |= hmac.compare_digest(candidate.encode(), key.encode())
        return matched

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
