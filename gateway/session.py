"""Sessions and task records: pure state, the clock passed in.

A session is what a client resumes with ``connectionSessionUUID``::

    active ──socket drops──▶ detached ──ttl (120 s)──▶ expired
       ▲                        │
       └──authenticates again───┘  (same API key; its undelivered results replay once)

Results for a detached session wait in its replay buffer. A session belongs to the API
key that opened it: resuming it with another key gets a fresh session. REST requests
share a :meth:`~SessionStore.transient` session: never attached, never resumed, it keeps
nothing (their results reach them through the task records).

Task records remember every ``taskUUID`` while it runs and for ``record_ttl`` after.
A ``taskUUID`` is unique across API keys (a second task with it, from any key, gets
``conflictTaskUUID``), while :meth:`~SessionStore.lookup` (``getResponse``) only finds
the records of the asking key.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count

from .errors import TaskError

__all__ = ["Session", "SessionStore", "TaskRecord"]


@dataclass(eq=False)
class Session:
    session_id: str
    api_key: str
    attached: bool = True
    detached_at: float | None = None
    expired: bool = False  # past its TTL: forgotten, and keeps nothing more
    replay: deque[bytes] = field(default_factory=deque)  # frames that found no socket
    resumable: bool = True  # False for a REST request's transient session


@dataclass(eq=False)
class TaskRecord:
    task_uuid: str
    task_type: str
    api_key: str
    session: Session
    deliver_async: bool
    status: str = "processing"  # processing → success | error
    progress: int = 0
    item: dict | None = None  # the success item
    error: TaskError | None = None
    finished_at: float | None = None
    # Set by the REST transport: a digest of the task's content, so that a retry of the
    # same task (same key, same content) can attach to it instead of conflicting.
    fingerprint: bytes | None = None
    # Callbacks for when it finishes (GatewayState.watch); emptied when the task finishes.
    watchers: list[Callable] | None = None
    # Queued with its registration (GatewayState.register's ``admit``).
    admitted: bool = False

    @property
    def finished(self) -> bool:
        return self.status != "processing"


class SessionStore:
    def __init__(
        self,
        *,
        session_ttl: float = 120.0,
        record_ttl: float = 3600.0,
        max_records: int = 100_000,
        max_replay: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session_ttl = session_ttl
        self.record_ttl = record_ttl
        self.max_records = max_records
        self.max_replay = max_replay
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._records: dict[str, TaskRecord] = {}  # taskUUID → record, whatever its key
        self._finished: OrderedDict[str, TaskRecord] = OrderedDict()  # in finishing order
        self._transient_ids = count()
        self._running: dict[str, int] = {}  # API key → unfinished tasks
        self._expired_at = float("-inf")

    # Sessions

    def open(self, api_key: str, resume_id: str | None) -> tuple[Session, list[bytes]]:
        """Authenticate: resume ``resume_id`` if it is this key's and not expired
        (returning its undelivered frames, each handed out once), else a new session."""
        self.expire()
        session = self._sessions.get(resume_id or "")
        if session is not None and session.api_key == api_key:
            session.attached, session.detached_at = True, None
            frames = list(session.replay)
            session.replay.clear()
            return session, frames
        session = Session(str(uuid.uuid4()), api_key)
        self._sessions[session.session_id] = session
        return session, []

    def transient(self) -> Session:
        """A session for REST requests (any key): never attached and not resumable, so it
        keeps no frames; their results reach them through the task records."""
        return Session(f"transient-{next(self._transient_ids)}", "", attached=False, resumable=False)

    def detach(self, session: Session) -> None:
        session.attached, session.detached_at = False, self.clock()

    def keep(self, session: Session, frame: bytes) -> None:
        """Hold a frame for a session whose socket is gone (bounded: oldest dropped).
        An expired session can never be resumed, so it keeps nothing (its task records
        still point at it, and would otherwise hold the frames for the record TTL), and
        neither does a transient one."""
        if session.expired or not session.resumable:
            return
        session.replay.append(frame)
        while len(session.replay) > self.max_replay:
            session.replay.popleft()

    def expire(self) -> None:
        """Drop expired sessions and records; cheap to call often (runs at most once a second)."""
        now = self.clock()
        if now - self._expired_at < 1.0:
            return
        self._expired_at = now
        for sid in [
            s.session_id
            for s in self._sessions.values()
            if not s.attached and s.detached_at is not None and now - s.detached_at >= self.session_ttl
        ]:
            session = self._sessions.pop(sid)
            session.expired = True
            session.replay.clear()
        # Finished records leave in finishing order; running ones are never in _finished,
        # so a long task cannot hold back the expiry of those that finished after it.
        while self._finished:
            key, record = next(iter(self._finished.items()))
            if record.finished_at is not None and now - record.finished_at < self.record_ttl:
                break
            del self._finished[key]
            self._records.pop(key, None)

    # Task records

    def register(
        self, api_key: str, session: Session, task_uuid: str, task_type: str, deliver_async: bool
    ) -> TaskRecord:
        """A new task; raises ``conflictTaskUUID`` if ``task_uuid`` is known (for any key)."""
        self.expire()
        if task_uuid in self._records:
            raise TaskError(
                "conflictTaskUUID",
                "a task with this taskUUID is already known; use a new UUID, or getResponse to read its result",
                parameter="taskUUID",
                type="string",
            )
        record = TaskRecord(task_uuid, task_type, api_key, session, deliver_async)
        self._records[task_uuid] = record
        self._running[api_key] = self._running.get(api_key, 0) + 1
        self._bound_records()
        return record

    def finish(self, record: TaskRecord, *, item: dict | None = None, error: TaskError | None = None) -> bool:
        """Record the terminal outcome; False if it was already finished (never twice)."""
        if record.finished:
            return False
        record.status = "success" if error is None else "error"
        record.item, record.error, record.finished_at = item, error, self.clock()
        record.progress = 100 if error is None else record.progress
        self._running[record.api_key] -= 1
        if not self._running[record.api_key]:
            del self._running[record.api_key]
        self._finished[record.task_uuid] = record
        self._bound_records()
        return True

    def forget(self, record: TaskRecord) -> None:
        """Drop a finished record, so that its ``taskUUID`` can run again (a REST retry
        of a task that failed for a reason a retry may cure)."""
        assert record.finished, "a running task's record is never forgotten"
        if self._records.get(record.task_uuid) is record:
            del self._records[record.task_uuid]
            self._finished.pop(record.task_uuid, None)

    def lookup(self, api_key: str, task_uuid: str) -> TaskRecord | None:
        """``api_key``'s record of ``task_uuid`` (another key's is not found)."""
        self.expire()
        record = self._records.get(task_uuid)
        return record if record is not None and record.api_key == api_key else None

    def running(self, api_key: str) -> int:
        return self._running.get(api_key, 0)

    def detached(self) -> int:
        """Sessions without a socket, kept for a resume until their TTL ends."""
        self.expire()
        return sum(not s.attached for s in self._sessions.values())

    def running_total(self) -> int:
        """Unfinished tasks of every API key."""
        return sum(self._running.values())

    def _bound_records(self) -> None:
        """Forget the oldest finished records beyond ``max_records`` (running ones stay)."""
        while len(self._records) > self.max_records and self._finished:
            key, _ = self._finished.popitem(last=False)
            self._records.pop(key, None)
