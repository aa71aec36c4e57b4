"""Where sessions, task records and undelivered frames live, behind one async interface.

:class:`GatewayState` is what the gateway core (``delivery.py``) asks to open and resume
sessions, register and finish tasks (exactly once), answer ``getResponse`` and carry
each frame to whichever socket holds its session. Two implementations:

- :class:`LocalState` (``serve``): the pure :class:`~gateway.session.SessionStore` plus
  the map of attached peers, all in this process; no method ever waits.
- ``gateway.cluster.state.RedisState`` (cluster gateways and workers): the same on
  Redis, so that any gateway can resume a session, any worker can finish a task, and
  every process agrees on what is finished.

A *peer* (``peer.py``) is whatever sent a task: a WebSocket connection, or one task of a
REST request.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from engine.api import UpscaleRequest

from .errors import TaskError
from .images import StoredImage
from .peer import Peer
from .protocol import data_frame, error_frame
from .session import Session, SessionStore, TaskRecord

__all__ = ["Admission", "GatewayState", "LocalState", "Peer"]


class Admission(NamedTuple):
    """An upscale's engine request and its input image, not stored yet: a state whose
    engine shares its store (a cluster's) registers the task, stores the image and
    queues the request in one step (:meth:`GatewayState.register`)."""

    request: UpscaleRequest
    image: StoredImage


class GatewayState(abc.ABC):
    #: True when nothing here waits (the core then runs a task's admission and its
    #: completion inline, without a task of their own).
    local: bool = False
    #: True when :meth:`finish` itself queues a task's webhook durably (a cluster);
    #: otherwise the core posts it.
    queues_webhooks: bool = False
    #: A frame as sent, from one kept without its image payload (set by the gateway core:
    #: a cluster keeps large payloads out of Redis's frames and webhooks).
    whole_frame: Callable[[bytes], Awaitable[bytes]] | None = None

    async def start(self) -> None:
        """Connect, and start any background work."""
        return None

    async def close(self) -> None:
        """Stop background work and release connections."""
        return None

    @property
    def ready(self) -> bool:
        return True

    # Sessions

    @abc.abstractmethod
    async def open(self, api_key: str, resume_id: str | None, peer: Peer) -> tuple[Session, list[bytes]]:
        """Authenticate ``peer``: resume ``resume_id`` if it is this key's and alive
        (with its undelivered frames, each handed out once), else a new session.
        The session is attached to ``peer`` from now on."""

    @abc.abstractmethod
    async def detach(self, session: Session, peer: Peer) -> None:
        """``peer`` is gone: its session keeps frames until it is resumed or expires."""

    @abc.abstractmethod
    def keep(self, session: Session, frame: bytes) -> None:
        """A frame its peer could not send: keep it for the session's resume."""

    def running(self, api_key: str) -> int:
        """Tasks of ``api_key`` admitted here and not yet finished."""
        return 0

    # Task records

    def counts(self) -> dict[str, int]:
        """Upscale tasks registered here and not yet answered, and sessions with a live
        peer here (``GET /stats``)."""
        return {"tasks_in_flight": 0, "sessions_attached": 0}

    def settled(self, record: TaskRecord) -> None:
        """A task registered here was finished elsewhere (by a cluster worker)."""
        return None

    @abc.abstractmethod
    async def register(
        self,
        api_key: str,
        session: Session,
        task_uuid: str,
        task_type: str,
        deliver_async: bool,
        origin: Peer | None = None,
        fingerprint: bytes | None = None,
        admit: Admission | None = None,
    ) -> TaskRecord:
        """A new task (``origin``: the peer that sent it; ``fingerprint``: a digest of its
        content, for REST retries); raises ``conflictTaskUUID`` if ``task_uuid`` is known.
        With ``admit``, a state that can also stores the image and queues the request in
        the same step, and sets the record's ``admitted``; others ignore it."""

    @abc.abstractmethod
    async def forget(self, record: TaskRecord) -> None:
        """Drop a finished record, so that its ``taskUUID`` can run again (a REST retry
        of a task that failed for a reason a retry may cure)."""

    @abc.abstractmethod
    def transient_session(self) -> Session:
        """A session for REST requests: never attached, never resumed, it keeps nothing
        (their results reach them through the task records: :meth:`watch`)."""

    @abc.abstractmethod
    def watch(self, record: TaskRecord, callback: Callable[[TaskRecord, bytes | None], None]) -> None:
        """Call ``callback(finished_record, frame)`` once when the unfinished task of
        ``record`` finishes; ``frame`` is its terminal frame when it is at hand here,
        else None (build it from the record)."""

    @abc.abstractmethod
    async def finish(
        self,
        record: TaskRecord,
        *,
        item: dict | None,
        error: TaskError | None,
        origin: Peer | None = None,
        webhook: str | None = None,
    ) -> bool:
        """The task's one terminal outcome: record it and, for a sync task, deliver its
        frame to the session (``origin``: the peer that sent the task, if known). False
        (and nothing done) if it had already finished. With :attr:`queues_webhooks`, a
        ``webhook`` gets the outcome from a durable queue; otherwise the caller posts it."""

    @abc.abstractmethod
    def progress(self, record: TaskRecord, percent: int, live: bool) -> None:
        """The task is ``percent`` done; with ``live``, send a progress item to its session."""

    @abc.abstractmethod
    async def lookup(self, api_key: str, task_uuid: str) -> TaskRecord | None:
        """``api_key``'s task ``task_uuid`` (running or finished), or None."""


class LocalState(GatewayState):
    """Everything in this process: sessions and records in a :class:`SessionStore`,
    frames handed to the peer attached to their session or kept for its resume."""

    local = True

    def __init__(self, sessions: SessionStore) -> None:
        self.sessions = sessions
        self._attached: dict[str, Peer] = {}  # session id → its live peer

    async def open(self, api_key: str, resume_id: str | None, peer: Peer) -> tuple[Session, list[bytes]]:
        session, replay = self.sessions.open(api_key, resume_id)
        self._attached[session.session_id] = peer
        return session, replay

    async def detach(self, session: Session, peer: Peer) -> None:
        if self._attached.get(session.session_id) is peer:
            del self._attached[session.session_id]
            self.sessions.detach(session)

    def keep(self, session: Session, frame: bytes) -> None:
        self.sessions.keep(session, frame)

    def running(self, api_key: str) -> int:
        return self.sessions.running(api_key)

    def attached(self) -> list[Peer]:
        return list(self._attached.values())

    def counts(self) -> dict[str, int]:
        return {
            "tasks_in_flight": self.sessions.running_total(),
            "sessions_attached": len(self._attached),
            "sessions_detached": self.sessions.detached(),
        }

    def deliver(self, session: Session, frame: bytes) -> None:
        """Send ``frame`` on the session's socket, or keep it for when it resumes."""
        peer = self._attached.get(session.session_id)
        if peer is None or not peer.send(frame):
            self.sessions.keep(session, frame)

    async def register(
        self,
        api_key: str,
        session: Session,
        task_uuid: str,
        task_type: str,
        deliver_async: bool,
        origin: Peer | None = None,
        fingerprint: bytes | None = None,
        admit: Admission | None = None,
    ) -> TaskRecord:
        record = self.sessions.register(api_key, session, task_uuid, task_type, deliver_async)
        record.fingerprint = fingerprint
        return record

    async def forget(self, record: TaskRecord) -> None:
        self.sessions.forget(record)

    def transient_session(self) -> Session:
        return self.sessions.transient()

    def watch(self, record: TaskRecord, callback: Callable[[TaskRecord, bytes | None], None]) -> None:
        if record.watchers is None:
            record.watchers = [callback]
        else:
            record.watchers.append(callback)

    async def finish(
        self,
        record: TaskRecord,
        *,
        item: dict | None,
        error: TaskError | None,
        origin: Peer | None = None,
        webhook: str | None = None,
    ) -> bool:
        # The record keeps the item without its image payload (getResponse rebuilds it
        # from the image store), so an hour of task records never holds an hour of images.
        if not self.sessions.finish(record, item=without_payload(item), error=error):
            return False
        frame = None
        if not record.deliver_async or record.watchers:
            frame = data_frame(item) if error is None else error_frame(error)
        if record.watchers:  # REST requests waiting for this task
            watchers, record.watchers = record.watchers, None
            for watcher in watchers:
                watcher(record, frame)
        if record.deliver_async:
            return True
        if error is None:
            self.deliver(record.session, frame)
            return True
        # An error goes where a result would, except to a socket other than the one that
        # sent the task whose client cannot route it (``Peer.replays_errors``): the task
        # record keeps it for getResponse.
        peer = self._attached.get(record.session.session_id)
        if peer is None or peer is origin or peer.replays_errors:
            self.deliver(record.session, frame)
        return True

    def progress(self, record: TaskRecord, percent: int, live: bool) -> None:
        record.progress = percent
        if live and not record.deliver_async and not record.finished:
            self.deliver(record.session, data_frame(progress_item(record, percent)))

    async def lookup(self, api_key: str, task_uuid: str) -> TaskRecord | None:
        return self.sessions.lookup(api_key, task_uuid)


def progress_item(record: TaskRecord, percent: int) -> dict:
    """A ``processing`` item; it carries no key ending in URL/Base64Data/DataURI (the new
    SDKs take any item with one as final)."""
    return {
        "taskType": record.task_type,
        "taskUUID": record.task_uuid,
        "status": "processing",
        "progress": percent,
    }


_PAYLOADS = ("imageBase64Data", "imageDataURI")


def without_payload(item: dict | None) -> dict | None:
    """A success item as a record keeps it: an inline image payload is replaced by a
    ``_payload`` marker naming its kind (:func:`with_payload` restores it)."""
    if item is None:
        return None
    for kind in _PAYLOADS:
        if kind in item:
            return {**{k: v for k, v in item.items() if k != kind}, "_payload": kind}
    return item
