"""Sessions, task records and frame delivery on Redis (:class:`RedisState`).

Any gateway can resume any session and any process can finish any task:

- A task's record is a hash; :meth:`RedisState.finish` is the ``FINISH`` script, so only
  the first terminal outcome of a task wins, whichever worker or gateway sends it (a
  stalled worker's late result is dropped: fenced on the result, not the ack).
- A session is a hash (owner key hash, owning gateway, cursor) and an *outbox* stream
  of its frames. Finishing a sync task appends its frame and pushes a notice of it (the
  frame itself) on the owning gateway's delivery list, on which that gateway blocks:
  popping it is the hand-over, and the gateway sends the frame to its socket at once
  (a frame whose image payload was too large to go through a script gets it back from
  the image store first). A task's last notice also tells the gateway that queued it
  that the task is done, when it went to that gateway (else a message does).
  Resuming on another gateway makes it the owner and replays what lies past the
  session's cursor with ``TAKE``, which skips the frames whose notices were popped
  already and takes back those still waiting, so each frame goes out once. A sweep
  every second takes what no notice carried (a frame given back, Redis restarted), and
  keeps the TTLs of attached sessions fresh.
- When Redis cannot be reached, or lost a task's record (restarted empty), a gateway
  answers its own peers' tasks itself, and remembers them so a late duplicate from
  the outbox is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable

import orjson

from ..completion import PAYLOAD_MARK
from ..errors import TaskError
from ..images import StoredImage, new_uuid
from ..inputs import is_uuid
from ..protocol import data_frame, error_frame
from ..session import Session, TaskRecord
from ..state import Admission, GatewayState, Peer, progress_item, without_payload
from . import keys
from .images import put_image
from .link import ClusterUnavailable, RedisLink, cancel_all, guarded, raise_errors
from .scripts import INLINE_IMAGE_BYTES

__all__ = ["RedisState"]

logger = logging.getLogger(__name__)

SWEEP_EVERY = 1.0  # seconds between sweeps of attached sessions' outboxes
TAKE_COUNT = 256  # frames handed out per TAKE
MAX_REPLAY = 1024  # frames an outbox keeps (approximately: MAXLEN ~)
ANSWERED_LOCALLY = 10_000  # tasks answered here while Redis could not be (remembered)
PAYLOAD_MARGIN = 600.0  # seconds an image left out of a frame must outlive the session (see finish)


def unavailable(message: str = "") -> TaskError:
    return TaskError(
        "serviceUnavailable",
        "the cluster's queue (Redis) cannot be reached; try again shortly" + message,
    )


class RedisState(GatewayState):
    local = False
    queues_webhooks = True

    def __init__(
        self,
        link: RedisLink,
        *,
        member_id: str,
        session_ttl: float,
        record_ttl: float,
        serves_sessions: bool = True,
    ) -> None:
        self.link = link
        self.member_id = member_id  # this gateway's (or worker's) id
        self.session_ttl = session_ttl
        self.record_ttl = record_ttl
        self.serves_sessions = serves_sessions  # False for a worker: it only finishes tasks
        self.on_task_done: Callable[[str], None] | None = None  # a task this gateway submitted ended
        self._attached: dict[str, Peer] = {}  # session id → its live peer here
        self._draining: dict[str, bool] = {}  # session id → drain again when done
        self._running: Counter[str] = Counter()  # API key → tasks registered here, unfinished
        self._registered: set[str] = set()  # those tasks
        self._peer_ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._ids = itertools.count()
        self._answered: OrderedDict[str, None] = OrderedDict()  # see ANSWERED_LOCALLY
        # REST requests waiting for tasks: task → [(record, callback)] (see watch)
        self._watched: dict[str, list[tuple[TaskRecord, Callable[[TaskRecord, bytes | None], None]]]] = {}
        self._progress: dict[str, tuple[str, str, bytes]] = {}  # task → (key, percent, frame)
        self._flushing = False
        self.queue = None  # the gateway's RedisEngineClient: it enqueues with registrations
        self._jobs: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        self._deliverer: asyncio.Task | None = None
        if serves_sessions:
            link.subscribe(keys.gateway_channel(member_id), self._on_message)
            link.on_reconnect(lambda: self._spawn(self._reattach()))

    # Lifecycle

    async def start(self) -> None:
        if self.serves_sessions:
            self._sweeper = asyncio.create_task(self._sweep(), name="outbox-sweep")
            self._deliverer = asyncio.create_task(self._deliver_loop(), name="outbox-deliver")

    async def close(self) -> None:
        loops = [loop for loop in (self._sweeper, self._deliverer) if loop is not None]
        await cancel_all([*self._jobs, *loops])

    @property
    def ready(self) -> bool:
        return self.link.healthy

    def _spawn(self, coro) -> None:
        job = asyncio.create_task(coro)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    def _peer_id(self, peer: Peer) -> str:
        peer_id = self._peer_ids.get(peer)
        if peer_id is None:
            peer_id = self._peer_ids[peer] = f"{self.member_id}/{next(self._ids)}"
        return peer_id

    # Sessions

    async def open(self, api_key: str, resume_id: str | None, peer: Peer) -> tuple[Session, list[bytes]]:
        ttl_ms = _ms(self.session_ttl)
        owner = keys.key_hash(api_key)
        session_id = None
        if resume_id and is_uuid(resume_id):  # only ids this cluster could have issued
            args = [owner, self.member_id, ttl_ms, "resume"]
            resumed = await self._script("OPEN", [keys.session(resume_id), keys.outbox(resume_id)], args)
            session_id = resume_id if resumed else None
        if session_id is None:  # unknown, expired or another key's: a fresh session
            session_id = str(uuid.uuid4())
            args = [owner, self.member_id, ttl_ms, "create"]
            await self._script("OPEN", [keys.session(session_id), keys.outbox(session_id)], args)
        session = Session(session_id, api_key)
        replay = []
        for frame, _, _ in await self._take(session_id):
            whole = await self._whole(session, frame)  # (None: kept for the next drain)
            if whole is not None:
                replay.append(whole)
        self._attached[session_id] = peer
        return session, replay

    async def detach(self, session: Session, peer: Peer) -> None:
        if self._attached.get(session.session_id) is not peer:
            return
        del self._attached[session.session_id]
        sid = session.session_id
        try:
            await self.link.script(
                "DETACH", [keys.session(sid), keys.outbox(sid)], [self.member_id, _ms(self.session_ttl)]
            )
        except ClusterUnavailable as exc:
            logger.warning("could not let go of session %s: %s", sid, exc)

    async def _reattach(self) -> None:
        """Redis is back (perhaps restarted empty): put back the sessions served here."""
        for session_id, peer in list(self._attached.items()):
            try:
                await self._put_back(session_id, peer)
            except TaskError as exc:
                logger.warning("session %s not put back: %s", session_id, exc.__cause__)
                return
        self._sweep_now()

    async def _put_back(self, session_id: str, peer: Peer) -> None:
        args = [keys.key_hash(peer.api_key), self.member_id, _ms(self.session_ttl), "ensure"]
        await self._script("OPEN", [keys.session(session_id), keys.outbox(session_id)], args)

    def _sweep_now(self) -> None:
        for session_id in list(self._attached):
            self._drain_soon(session_id)

    def keep(self, session: Session, frame: bytes) -> None:
        """A frame its socket could not send goes back to the end of its outbox."""
        is_error = b"1" if frame.startswith(b'{"errors"') else b"0"
        self._spawn(self._keep(session.session_id, frame, is_error))

    async def _keep(self, session_id: str, frame: bytes, is_error: bytes, origin: str = "", task: str = "") -> None:
        args = [*self._prefixes(), session_id, frame, is_error, origin, task, MAX_REPLAY, self.member_id]
        try:
            await self.link.script("KEEP", [], args)
        except ClusterUnavailable as exc:
            logger.warning("a frame for session %s could not be kept: %s", session_id, exc)

    def running(self, api_key: str) -> int:
        return self._running[api_key]

    def counts(self) -> dict[str, int]:
        return {"tasks_in_flight": sum(self._running.values()), "sessions_attached": len(self._attached)}

    def settled(self, record: TaskRecord) -> None:
        self._count_finished(record)

    def _count_finished(self, record: TaskRecord) -> None:
        """A task registered here no longer counts toward its key's tasks in flight."""
        if record.task_uuid not in self._registered:
            return  # not registered here (a worker's), or counted already
        self._registered.discard(record.task_uuid)
        self._running[record.api_key] -= 1
        if self._running[record.api_key] <= 0:
            del self._running[record.api_key]

    # Task records

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
        """With ``admit`` (and images in Redis), one round trip: the input image, the
        ``REGISTER`` and the ``ENQUEUE``, which queues only if that ``REGISTER`` created
        the record (a nonce tells)."""
        if admit is not None and (self.queue is None or not self.queue.images_in_redis):
            admit = None
        nonce = new_uuid() if admit is not None else ""
        args = [
            keys.key_hash(api_key),
            session.session_id,
            int(deliver_async),
            task_type,
            _ms(self.record_ttl),
            self.member_id,
            self._peer_id(origin) if origin is not None else "",
            fingerprint.hex() if fingerprint else "",
            nonce,
        ]
        try:
            if admit is None:
                known = await self.link.script("REGISTER", [keys.task(task_uuid)], args)
            else:
                known, enqueued = await self._admit(task_uuid, args, admit, nonce)
        except ClusterUnavailable as exc:
            raise unavailable() from exc
        if known[0] == 1:
            raise TaskError(
                "conflictTaskUUID",
                "a task with this taskUUID is already known; use a new UUID, or getResponse to read its result",
                parameter="taskUUID",
                type="string",
            )
        self._running[api_key] += 1
        self._registered.add(task_uuid)
        record = TaskRecord(task_uuid, task_type, api_key, session, deliver_async)
        record.fingerprint = fingerprint
        if admit is not None:
            self.queue.admitted(admit.request, enqueued)
            record.admitted = True
        return record

    async def _admit(self, task_uuid: str, args: list, admit: Admission, nonce: str) -> tuple[list, object]:
        """The admission's pipeline: REGISTER's and ENQUEUE's answers."""
        async with self.link.redis.pipeline(transaction=False) as pipe:
            put_image(pipe, admit.image)
            self.link.queue(pipe, "REGISTER", [keys.task(task_uuid)], args)
            self.queue.queue_enqueue(pipe, admit.request, nonce)
            answers = await self.link.execute(pipe, raise_on_error=False)
        raise_errors(answers[:-1])  # the image and the record (ENQUEUE's answer: the queue's to judge)
        return answers[-2], answers[-1]

    async def forget(self, record: TaskRecord) -> None:
        await self._script("FORGET", [keys.task(record.task_uuid)], [])

    def transient_session(self) -> Session:
        # No such session in Redis: FINISH, PROGRESS and KEEP append nothing for it.
        return Session(f"rest-{self.member_id}", "", attached=False, resumable=False)

    def watch(self, record: TaskRecord, callback: Callable[[TaskRecord, bytes | None], None]) -> None:
        self._watched.setdefault(record.task_uuid, []).append((record, callback))
        self._spawn(self._check_watched([record.task_uuid]))  # it may have finished already

    async def _check_watched(self, task_uuids: list[str]) -> None:
        """Call the watchers of those tasks that have finished (with their records)."""
        task_uuids = [u for u in task_uuids if u in self._watched]
        if not task_uuids:
            return
        try:
            statuses = await task_statuses(self.link, task_uuids)
        except ClusterUnavailable:
            return  # the next sweep looks again
        for task_uuid, status in zip(task_uuids, statuses):
            if status == b"processing" or task_uuid not in self._watched:
                continue
            watchers = self._watched.pop(task_uuid)
            record = watchers[0][0]
            found = None if status is None else await self.lookup(record.api_key, task_uuid)
            if found is None:  # the record is gone (Redis restarted empty)
                found = record
                found.status, found.error = "error", TaskError("taskLost", LOST).for_task(
                    record.task_type, task_uuid
                )
            for _, callback in watchers:
                callback(found, None)

    def _finished_here(self, record: TaskRecord, frame: bytes, item: dict | None, error: TaskError | None) -> None:
        """Watchers of a task this gateway finished itself get its frame at once."""
        watchers = self._watched.pop(record.task_uuid, None)
        if not watchers:
            return
        record.status, record.item, record.error = ("success" if error is None else "error"), item, error
        whole = frame or (data_frame(item) if error is None else error_frame(error))
        for _, callback in watchers:
            callback(record, whole)

    async def finish(
        self,
        record: TaskRecord,
        *,
        item: dict | None,
        error: TaskError | None,
        origin: Peer | None = None,
        webhook: str | None = None,
        image: StoredImage | None = None,
        payload_ttl: float | None = None,
    ) -> bool:
        """(``image``: an output image to write in the same step, see ``Completion.outcome``.)

        A large image payload (over ``INLINE_IMAGE_BYTES``) is left out of the frame and
        the webhook that go through ``FINISH`` when the image outlives any replay of them
        (``payload_ttl``, its lifetime, beyond the session TTL by ``PAYLOAD_MARGIN``):
        Redis copies a script's arguments at about 4 us per KB (a 200 KB frame made
        ``FINISH`` take 0.8 ms of its one thread, and the outbox kept another copy of the
        image). The gateway sending the frame, or posting the webhook, reads the image
        back from the store (``Completion.whole_frame``)."""
        light = without_payload(item)
        heavy = (
            light is not item  # (a success item with an image payload)
            and len(item[light["_payload"]]) > INLINE_IMAGE_BYTES
            and payload_ttl is not None
            and payload_ttl >= self.session_ttl + PAYLOAD_MARGIN
        )
        sent = light if heavy else item
        frame = b"" if record.deliver_async else data_frame(sent) if error is None else error_frame(error)
        whole = data_frame(item) if heavy and frame else frame  # (for an answer given here)
        result = orjson.dumps(light if error is None else error.to_wire())
        hook = orjson.dumps(sent if error is None else error.to_wire()) if webhook else b""
        sess, out, suffix, deliver = self._prefixes()
        args = [
            "success" if error is None else "error",
            result,
            frame,
            0 if error is None else 1,
            webhook or "",
            hook,
            _ms(self.record_ttl),
            MAX_REPLAY,
            sess,
            out,
            keys.queue("")[:-1],
            suffix,
            keys.gateway_channel(""),
            record.task_uuid,
            deliver,
        ]
        try:
            won = await self._finish(record, args, image)
        except ClusterUnavailable as exc:
            if not self.serves_sessions:
                raise  # a worker retries until Redis is back
            logger.warning("task %s could not be recorded (%s); answering it here", record.task_uuid, exc)
            won = -1
        if won == -1:  # Redis is away or lost the task: its own gateway answers it, if it is here
            answered = self._answer_here(record, whole)
        else:
            answered = won == 1
            if answered:
                self._count_finished(record)
        if answered:
            self._finished_here(record, whole, item, error)
        return answered

    async def _finish(self, record: TaskRecord, args: list, image: StoredImage | None) -> int:
        if image is None:
            return await self.link.script("FINISH", [keys.task(record.task_uuid), keys.HOOKS], args)
        async with self.link.redis.pipeline(transaction=True) as pipe:
            put_image(pipe, image)
            self.link.queue(pipe, "FINISH", [keys.task(record.task_uuid), keys.HOOKS], args)
            return (await self.link.execute(pipe))[-1]

    def _answer_here(self, record: TaskRecord, frame: bytes) -> bool:
        if not self.serves_sessions:
            return False
        self._count_finished(record)
        self._answered[record.task_uuid] = None
        while len(self._answered) > ANSWERED_LOCALLY:
            self._answered.popitem(last=False)
        peer = self._attached.get(record.session.session_id)
        if frame and peer is not None:
            peer.send(frame)
        return True

    def progress(self, record: TaskRecord, percent: int, live: bool) -> None:
        frame = data_frame(progress_item(record, percent)) if live and not record.deliver_async else b""
        self._progress[record.task_uuid] = (keys.task(record.task_uuid), str(percent), frame)
        if not self._flushing:
            self._flushing = True
            self._spawn(self._flush_progress())

    async def _flush_progress(self) -> None:
        """Progress of every task that moved since the last flush, in one round trip."""
        await asyncio.sleep(0)  # let the outputs of this loop turn gather
        updates, self._progress, self._flushing = self._progress, {}, False
        sess, out, suffix, deliver = self._prefixes()
        try:
            async with self.link.redis.pipeline(transaction=False) as pipe:
                for task_uuid, (key, percent, frame) in updates.items():
                    args = [percent, frame, MAX_REPLAY, sess, out, suffix, deliver, task_uuid]
                    self.link.queue(pipe, "PROGRESS", [key], args)
                await self.link.execute(pipe)
        except ClusterUnavailable as exc:
            logger.debug("progress not recorded: %s", exc)

    async def lookup(self, api_key: str, task_uuid: str) -> TaskRecord | None:
        try:
            fields = await guarded(self.link.redis.hgetall(keys.task(task_uuid)))
        except ClusterUnavailable as exc:
            raise unavailable() from exc
        fields = {k.decode(): v for k, v in fields.items()}
        if fields.get("key", b"").decode() != keys.key_hash(api_key):
            return None
        record = TaskRecord(
            task_uuid,
            fields["type"].decode(),
            api_key,
            Session(fields["sid"].decode(), api_key),
            fields.get("async") == b"1",
        )
        record.status = fields["status"].decode()
        record.progress = int(fields.get("progress", b"0"))
        if "item" in fields:
            record.item = orjson.loads(fields["item"])
        if "error" in fields:
            record.error = _error_from_wire(orjson.loads(fields["error"]))
        if fields.get("fp"):
            record.fingerprint = bytes.fromhex(fields["fp"].decode())
        return record

    # Delivery to this gateway's sockets

    async def _deliver_loop(self) -> None:
        """Pop the notices of frames handed to this gateway (see ``_APPEND``) and send
        each to its session's socket."""
        key = keys.deliver(self.member_id)
        while True:
            try:
                got = await self.link.command("BLMPOP", 1, 1, key, "LEFT", "COUNT", 256)
            except ClusterUnavailable as exc:
                logger.debug("delivery list not read: %s", exc)
                await asyncio.sleep(0.5)
                continue
            for notice in got[1] if got else ():
                try:
                    self._deliver(notice)
                except Exception:
                    logger.exception("a frame could not be delivered")
            if got:  # the frames' writes (scheduled by Peer.send) go out before the next BLMPOP
                await asyncio.sleep(0)

    def _deliver(self, notice: bytes) -> None:
        sid, _, kind, origin, task_uuid, frame = notice.split(b"\n", 5)
        task = task_uuid.decode()
        if PAYLOAD_MARK in frame:  # its image is read back first
            self._spawn(self._send_whole(sid.decode(), kind, origin.decode(), task, frame))
        else:
            self._send_notice(sid.decode(), kind, origin.decode(), task, frame)
        if task and kind != b"p":  # a task's last frame: FINISH told this gateway so, not by a message
            self._task_done(task)

    async def _send_whole(self, session_id: str, is_error: bytes, origin_id: str, task: str, frame: bytes) -> None:
        peer = self._attached.get(session_id)
        if peer is not None:  # (else it goes back to its outbox as it came, light)
            whole = await self._whole(Session(session_id, peer.api_key), frame)
            if whole is None:
                return  # kept for the next drain
            frame = whole
        self._send_notice(session_id, is_error, origin_id, task, frame)

    async def _whole(self, session: Session, frame: bytes) -> bytes | None:
        """``frame`` with its image payload back when it was kept without (see
        :meth:`finish`); None when the image store could not be read: then it went back
        to the session's outbox, for the next drain (every second) to try again."""
        if PAYLOAD_MARK not in frame or self.whole_frame is None:
            return frame
        try:
            return await self.whole_frame(frame)
        except Exception as exc:  # the store is away (Redis, S3)
            logger.warning("a result for session %s waits for its image (%s)", session.session_id, exc)
            self.keep(session, frame)
            return None

    def _send_notice(self, session_id: str, is_error: bytes, origin_id: str, task: str, frame: bytes) -> None:
        if task in self._answered:
            return  # answered here while Redis was away
        peer = self._attached.get(session_id)
        if peer is None:  # not (or no longer) here: back to its outbox, for its next owner
            self._spawn(self._keep(session_id, frame, is_error, origin_id, task))
            return
        if is_error == b"1" and not peer.replays_errors and origin_id != self._peer_id(peer):
            return  # see Peer.replays_errors: the record keeps it for getResponse
        if not peer.send(frame):
            self.keep(Session(session_id, peer.api_key), frame)

    def _on_message(self, data: bytes) -> None:
        kind, _, name = data.decode().partition(" ")
        if kind == "d":
            self._task_done(name)

    def _task_done(self, task_uuid: str) -> None:
        """A task this gateway may have queued or watches has finished."""
        if self.on_task_done is not None:
            self.on_task_done(task_uuid)
        if task_uuid in self._watched:
            self._spawn(self._check_watched([task_uuid]))

    def _drain_soon(self, session_id: str) -> None:
        if session_id not in self._attached:
            return
        if session_id in self._draining:
            self._draining[session_id] = True  # the running drain goes round again
            return
        self._draining[session_id] = False
        self._spawn(self._drain(session_id))

    async def _drain(self, session_id: str) -> None:
        """Hand the session's new frames to its socket (one drain per session at a time,
        so frames keep their order)."""
        try:
            while True:
                peer = self._attached.get(session_id)
                if peer is None:
                    return
                session = Session(session_id, peer.api_key)
                for frame, is_error, origin in await self._take(session_id):
                    if is_error and not peer.replays_errors and origin != self._peer_id(peer):
                        continue  # see Peer.replays_errors: the record keeps it for getResponse
                    frame = await self._whole(session, frame)
                    if frame is None:
                        continue
                    if not peer.send(frame):
                        self.keep(session, frame)
                if not self._draining.get(session_id):
                    return
                self._draining[session_id] = False
        except TaskError as exc:
            logger.debug("session %s not drained: %s", session_id, exc.__cause__)
        finally:
            self._draining.pop(session_id, None)

    async def _take(self, session_id: str) -> list[tuple[bytes, bool, str]]:
        """The session's frames past its cursor, each once, if this gateway owns it."""
        args = [self.member_id, TAKE_COUNT, keys.deliver("")[:-1], "}", session_id]
        got = await self._script("TAKE", [keys.session(session_id), keys.outbox(session_id)], args)
        if got[0] == -1 and session_id in self._attached:  # Redis lost it: its socket is still here
            await self._put_back(session_id, self._attached[session_id])
            return []
        if got[0] != 1:  # it was resumed on another gateway: it is theirs now
            self._attached.pop(session_id, None)
            return []
        frames = []
        for _, flat in got[1]:
            fields = dict(zip(flat[::2], flat[1::2]))
            if fields.get(b"t", b"").decode() in self._answered:
                continue  # answered here while Redis was away
            frames.append((fields[b"f"], fields.get(b"e") == b"1", fields.get(b"o", b"").decode()))
        return frames

    async def _sweep(self) -> None:
        """Every second: drain every attached session (what no notice carried: frames
        given back, or appended while Redis was away from this gateway), and keep the
        TTLs of attached sessions and their outboxes fresh."""
        refresh_every = max(1.0, self.session_ttl / 4)
        since_refresh = 0.0
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            since_refresh += SWEEP_EVERY
            self._sweep_now()
            if self._watched:
                await self._check_watched(list(self._watched))
            if since_refresh >= refresh_every and self._attached:
                since_refresh = 0.0
                try:
                    async with self.link.redis.pipeline(transaction=False) as pipe:
                        for session_id in self._attached:
                            pipe.pexpire(keys.session(session_id), _ms(self.session_ttl))
                            pipe.pexpire(keys.outbox(session_id), _ms(self.session_ttl))
                        await guarded(pipe.execute())
                except ClusterUnavailable as exc:
                    logger.debug("session TTLs not refreshed: %s", exc)

    # Helpers

    async def _script(self, name: str, keys_: list[str], args: list) -> object:
        try:
            return await self.link.script(name, keys_, args)
        except ClusterUnavailable as exc:
            raise unavailable() from exc

    @staticmethod
    def _prefixes() -> tuple[str, str, str, str]:
        """Key prefixes the outbox scripts assemble names from (see keys.py)."""
        return keys.session("")[:-1], keys.outbox("")[:-1], "}", keys.deliver("")[:-1]


LOST = "the cluster lost this task's state (its Redis restarted empty); send it again"


async def task_statuses(link: RedisLink, task_uuids: list[str]) -> list[bytes | None]:
    """The ``status`` of each task's record (None where it is gone), in one round trip."""
    async with link.redis.pipeline(transaction=False) as pipe:
        for task_uuid in task_uuids:
            pipe.hget(keys.task(task_uuid), "status")
        return await guarded(pipe.execute())


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _error_from_wire(wire: dict) -> TaskError:
    return TaskError(
        wire.get("code", "internalError"),
        wire.get("message", ""),
        parameter=wire.get("parameter"),
        type=wire.get("type"),
        task_type=wire.get("taskType"),
        task_uuid=wire.get("taskUUID"),
    )
