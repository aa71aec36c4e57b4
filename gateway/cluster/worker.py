"""A cluster worker: one engine, fed from the Redis queues by its own capacity.

Five loops around an :class:`~engine.client.EngineClient` (the same in-process engine
as ``serve``):

- **pull** — when woken (a ``lu:work`` hint, a request leaving the UNet while entries
  wait, its last task finished, or every half second), ``PULL`` takes entries that fit
  the free rows of its next UNet calls: first from the shapes it runs, so its batches
  stay full; a new shape only when it holds no rows (the one whose oldest entry waited
  longest), or when that entry has waited ``STARVE_AFTER`` and nobody idle took it. It
  never pulls ahead "just in case". Each entry is begun in the same step (a delivery
  counted: past ``max_deliveries`` the task is poison and ends with an error), its input
  read from the image store (in the same step when images are in Redis; from S3 after
  it otherwise), and submitted. A pull that finds nothing for a worker holding nothing
  registers it idle.
- **inbox** — blocks on the worker's inbox stream, where a gateway's ``ENQUEUE`` puts
  a task it took for this worker because it was idle (begun already): at light load a
  task reaches the engine without a pull round trip.
- **outputs** — progress (a request whose last step is done frees its rows and wakes
  the pull), and each terminal output completed here as in ``serve``
  (``completion.py``) and recorded by ``FINISH``: exactly once, whoever finishes first.
- **refresh** — twice per ``claim_timeout``: ``REFRESH`` resets the idle time of
  the entries it still owns; an entry that another worker took meanwhile is aborted here.
- **reap** — entries idle longer than ``claim_timeout`` (their worker died or stalled)
  are taken over with ``XAUTOCLAIM``, keeping a cursor per queue; consumers that hold
  nothing and have been idle a long time are removed (``XGROUP DELCONSUMER``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass

import orjson

from engine.api import EngineError, ErrorCode, Progress, UpscaleResult
from engine.client import EngineClient

from .. import logs
from ..completion import Completion
from ..config import ClusterConfig, GatewayConfig
from ..delivery import engine_request
from ..errors import TaskError, internal_error
from ..http import Outbound
from ..images import StoredImage, image_store
from ..metrics import Metrics
from ..observe import TaskEnds
from ..protocol import Upscale
from ..session import Session, TaskRecord
from . import keys
from .images import RedisImageStore
from .link import ClusterUnavailable, RedisLink, cancel_all, guarded
from .state import RedisState, unavailable

__all__ = ["Worker"]

logger = logging.getLogger(__name__)

STARVE_AFTER = 2.0  # seconds an entry of a shape nobody runs may wait before a busy worker takes it
PULL_EVERY = 0.5  # seconds between pulls when no hint comes
REAP_EVERY = 0.25  # seconds between looks for orphaned entries (at most)
FORGET_CONSUMERS_AFTER = 10  # × claim_timeout of idleness, holding nothing


@dataclass(eq=False)
class _Held:
    """An entry this worker pulled, until its task is finished."""

    task_uuid: str
    shape: str
    rows: int
    entry: str
    task: Upscale | None = None
    record: TaskRecord | None = None
    input_uuid: str = ""
    base_url: str = ""
    denoising: bool = True  # holds rows of the UNet's calls
    began: float = 0.0  # time.time() when this worker began it
    submitted: float | None = None  # time.monotonic() when it reached the engine

    @classmethod
    def of(cls, shape: str, entry: bytes, fields: dict[bytes, bytes]) -> _Held:
        """From a queue entry as redis-py reads or claims it."""
        return cls(fields[b"t"].decode(), shape, int(fields.get(b"r", b"1")), entry.decode())

    @property
    def queued_at(self) -> float:
        """When it was queued (``time.time()``, on Redis's clock): its stream entry id."""
        return int(self.entry.split("-", 1)[0]) / 1000

    @property
    def wants_progress(self) -> bool:
        return self.task is not None and (self.task.includeProgress or self.task.deliveryMethod == "async")


class Worker:
    def __init__(
        self,
        config: GatewayConfig,
        cluster: ClusterConfig,
        engine: EngineClient,
        link: RedisLink,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        """``metrics``: where its tasks, its engine's events and its outbound requests
        are counted (None: nowhere)."""
        self.config = config
        self.cluster = cluster
        self.engine = engine
        self.link = link
        self.id = cluster.member_id
        self.max_rows = config.engine.max_batch_rows
        self.store = image_store(config.image_store, link=link)
        # Images in Redis: the input comes with START and the output goes with FINISH
        # (one round trip each); in S3, they are read and written on their own.
        self.images_in_redis = isinstance(self.store, RedisImageStore)
        self._image_prefix = keys.image("")[:-1] if self.images_in_redis else ""
        self.state = RedisState(
            link,
            member_id=self.id,
            session_ttl=config.session_ttl,
            record_ttl=config.record_ttl,
            serves_sessions=False,
        )
        self.outbound = Outbound(allow_private=config.allow_private_networks, timeout=config.url_timeout)
        self.completion = Completion(
            self.store, self.outbound, output_ttl=config.output_ttl, price_per_gpu_hour=config.price_per_gpu_hour
        )
        self.metrics = metrics
        if metrics is not None:
            metrics.watch_engine(engine)
            self.outbound.observe = metrics.outbound_done
        self.ends = TaskEnds(metrics)  # each task's end: counted, and its log line
        self.held: dict[str, _Held] = {}
        self.redelivered = 0  # tasks this worker took over from another
        self.pushed = 0  # tasks a gateway handed it while it was idle (its inbox)
        self.dead_lettered = 0  # poison tasks it ended
        self.inputs_read = 0  # inputs it read itself (in S3, or too large to come with the task)
        self._wake = asyncio.Event()
        self._backlog = True  # entries may be waiting (the last pull said so, or none yet)
        self._inbox_seen = "0-0"  # the last inbox entry read
        self._stopping = False
        self._loops: list[asyncio.Task] = []
        self._jobs: set[asyncio.Task] = set()
        link.subscribe(keys.WORK_CHANNEL, lambda _: self._wake.set())

    # Lifecycle

    async def start(self) -> None:
        self.ends.watch(self.engine)
        await self.store.start()
        await self.engine.start()
        await self.state.start()
        await self._heartbeat()  # before its first pull: a consumer without one looks dead
        await self._recover()
        loops = (self._pull_loop, self._inbox_loop, self._outputs_loop, self._refresh_loop, self._reap_loop)
        self._loops = [asyncio.create_task(loop(), name=f"worker-{loop.__name__}") for loop in loops]
        self._wake.set()  # a first pull at once: it registers the worker idle if there is nothing
        logger.info("worker %s pulling work (%d rows per call)", self.id, self.max_rows)

    @property
    def ready(self) -> bool:
        return self.engine.ready and self.link.healthy and not self._stopping

    async def close(self, grace: float = 0.0) -> None:
        """Stop pulling; let what it holds finish within ``grace`` seconds. What is still
        unfinished then is left in the queue for another worker (not acknowledged)."""
        self._stopping = True
        with contextlib.suppress(ClusterUnavailable):  # no more work pushed to it
            await guarded(self.link.redis.zrem(keys.IDLE, self.id))
        deadline = time.monotonic() + grace
        while (self.held or self._jobs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await cancel_all(self._loops)
        await self.engine.close()
        await cancel_all(list(self._jobs))
        # What it still holds goes to other workers at once, not after the claim timeout.
        with contextlib.suppress(ClusterUnavailable):
            await guarded(self.link.redis.delete(keys.alive("worker", self.id)))
        await self.state.close()
        await self.store.close()
        await self.outbound.aclose()

    def _spawn(self, coro) -> None:
        job = asyncio.create_task(coro)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    # Capacity

    def held_rows(self) -> int:
        """UNet rows of the tasks it is denoising (its used capacity)."""
        return sum(self._used_rows().values())

    def _used_rows(self) -> dict[str, int]:
        used: dict[str, int] = {}
        for held in self.held.values():
            if held.denoising:
                used[held.shape] = used.get(held.shape, 0) + held.rows
        return used

    # Pull

    async def _pull_loop(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PULL_EVERY):
                    await self._wake.wait()
            self._wake.clear()
            if not self.link.healthy:
                continue
            try:
                await self._pull()
            except ClusterUnavailable as exc:
                logger.debug("pull skipped: %s", exc)
            except Exception:
                logger.exception("pulling work failed")

    async def _pull(self) -> None:
        used = self._used_rows()
        pairs = [x for shape, rows in used.items() if rows < self.max_rows for x in (shape, self.max_rows - rows)]
        starve = 0 if not used else int(STARVE_AFTER * 1000)
        suffix = "}"
        args = [self.id, self.max_rows, starve, keys.queue("")[:-1], suffix, self.cluster.max_deliveries]
        args += [keys.task("")[:-1], self._image_prefix, int(not self.held), self._inbox_seen, *pairs]
        more, taken = await self.link.script("PULL", [keys.SHAPES, keys.IDLE, keys.inbox(self.id)], args)
        self._backlog = bool(more)
        # Each: shape, entry id, task uuid, rows, then begin's answer.
        await self._start_all([self._hold(*t[:4]) for t in taken], [t[4:] for t in taken])

    def _hold(self, shape: bytes, entry: bytes, task_uuid: bytes, rows: bytes) -> _Held:
        held = _Held(task_uuid.decode(), shape.decode(), int(rows), entry.decode())
        self.held[held.task_uuid] = held
        return held

    async def _start_all(self, held: list[_Held], began: list[list]) -> None:
        # (inputs in S3 are read concurrently; in order otherwise)
        if len(held) == 1:  # (the usual hand-over: no task to schedule)
            await self._start(held[0], began[0])
        else:
            await asyncio.gather(*(self._start(h, b) for h, b in zip(held, began)))

    async def _inbox_loop(self) -> None:
        """Tasks a gateway took for this worker while it was idle (see ``ENQUEUE``)."""
        inbox = keys.inbox(self.id)
        while True:
            try:
                got = await self.link.command("XREAD", "COUNT", 64, "BLOCK", 1000, "STREAMS", inbox, self._inbox_seen)
            except ClusterUnavailable as exc:
                logger.debug("inbox not read: %s", exc)
                await asyncio.sleep(0.5)
                continue
            # (raw reply: [[inbox, [[entry id, [field, value, ...]], ...]]], or none)
            entries = [(entry, dict(zip(flat[::2], flat[1::2]))) for _, stream in got or () for entry, flat in stream]
            if not entries:
                continue
            self._inbox_seen = entries[-1][0].decode()
            fresh = [(i, f) for i, f in entries if f[b"t"].decode() not in self.held]
            held = [self._hold(f[b"s"], f[b"e"], f[b"t"], f[b"r"]) for _, f in fresh]
            self.pushed += len(held)
            began = [[f[name] for name in (b"v", b"c", b"i", b"a", b"y", b"n", b"m", b"d")] for _, f in fresh]
            await self._start_all(held, began)  # (PULL trims the entries read)

    async def _recover(self) -> None:
        """A worker restarted under the same id: what its previous run was pushed or had
        pending is begun again here (its idle mark and inbox are stale)."""
        try:
            await guarded(self.link.redis.delete(keys.inbox(self.id)))
            await guarded(self.link.redis.zrem(keys.IDLE, self.id))
            for shape in [s.decode() for s in await guarded(self.link.redis.smembers(keys.SHAPES))]:
                queue = keys.queue(shape)
                try:
                    pending = await guarded(
                        self.link.redis.xpending_range(queue, keys.WORKERS_GROUP, "-", "+", 1000, self.id)
                    )
                except ClusterUnavailable:
                    continue  # no group yet
                ids = [p["message_id"] for p in pending]
                if not ids:
                    continue
                entries = await guarded(self.link.redis.xclaim(queue, keys.WORKERS_GROUP, self.id, 0, ids))
                taken = [_Held.of(shape, entry, fields) for entry, fields in entries if fields]
                if taken:
                    logger.warning("taking back %d tasks of shape %s from this worker's previous run", len(taken), shape)
                    await self._take_over(taken)
        except ClusterUnavailable as exc:
            logger.warning("could not look for this worker's earlier tasks: %s", exc)

    async def _take_over(self, taken: list[_Held]) -> None:
        """Begin entries taken over from a silent worker (``START``, one round trip)."""
        for held in taken:
            self.held[held.task_uuid] = held
        args = [self.cluster.max_deliveries, self.id, self._image_prefix, "}"]
        try:
            answers = await self.link.script("START", [keys.task(h.task_uuid) for h in taken], args)
        except ClusterUnavailable:
            for held in taken:  # still pending under this consumer: reclaimed again later
                self.held.pop(held.task_uuid, None)
            raise
        self.redelivered += len(taken)
        await asyncio.gather(*(self._start(held, began) for held, began in zip(taken, answers)))

    async def _start(self, held: _Held, began: list) -> None:
        context = logs.TASK_UUID.set(held.task_uuid)  # on the log lines about it
        try:
            await self._start_one(held, began)
        except Exception:
            logger.exception("starting task %s failed", held.task_uuid)
            self._end(held, internal_error())
        finally:
            logs.TASK_UUID.reset(context)

    async def _start_one(self, held: _Held, began: list) -> None:
        held.began = time.time()
        kind = began[0].decode()
        if kind in ("gone", "done"):  # lost with Redis, or answered already: drop the entry
            self.held.pop(held.task_uuid, None)
            await self._drop_entry(held)
            return
        context, session_id, deliver_async, task_type, runs, media_type, data = began[1:8]
        job = orjson.loads(context)
        held.task = Upscale.model_validate(job["task"])
        held.input_uuid, held.base_url = job["input"], job["base"]
        held.record = TaskRecord(
            held.task_uuid, task_type.decode(), "", Session(session_id.decode(), ""), deliver_async == b"1"
        )
        if kind == "poison":
            self.dead_lettered += 1
            message = (
                f"the task was abandoned after {int(runs) - 1} deliveries: each time, the worker "
                "running it died or stalled"
            )
            logger.error("task %s: %s", held.task_uuid, message)
            self._end(held, TaskError(str(ErrorCode.RETRIES_EXHAUSTED), message))
            return
        if not data and (media_type or not self.images_in_redis):  # in S3, or too large to inline
            stored = await self._read_input(held)
            if stored is None:
                return
            media_type, data = stored.media_type, stored.data
        if not media_type:
            error = TaskError(
                "invalidInputImage",
                f"image {held.input_uuid} expired before the task ran; upload it again",
                parameter=held.task.image_field,
                type="string",
            )
            self._end(held, error)
            return
        request = engine_request(held.task_uuid, held.task, data, held.task.settings.seed or 0)
        if self.metrics is not None:
            self.metrics.cluster_wait.observe(max(0.0, held.began - held.queued_at))
        held.submitted = time.monotonic()
        # Its last step's Progress tells this worker when it leaves the UNet (rows free up).
        self.engine.submit(dataclasses.replace(request, want_denoised=True))

    async def _read_input(self, held: _Held) -> StoredImage | None:
        """The task's input from the image store (S3, or Redis for one too large to come
        with its task); None when the task was ended instead (the store cannot be
        reached: the task gets that error)."""
        self.inputs_read += 1
        try:
            stored = await self.store.get(held.input_uuid)
        except TaskError as error:
            self._end(held, error)
            return None
        except ClusterUnavailable:
            self._end(held, unavailable(" (reading the task's input image)"))
            return None
        return stored or StoredImage(held.input_uuid, b"", "", 0.0)  # (gone: "expired" below)

    async def _drop_entry(self, held: _Held) -> None:
        async with self.link.redis.pipeline(transaction=True) as pipe:
            pipe.xack(keys.queue(held.shape), keys.WORKERS_GROUP, held.entry)
            pipe.xdel(keys.queue(held.shape), held.entry)
            await guarded(pipe.execute())

    # Outputs

    async def _outputs_loop(self) -> None:
        async for output in self.engine.outputs():
            held = self.held.get(output.request_id)
            if held is None:
                continue  # taken away by another worker meanwhile
            if isinstance(output, Progress):
                if output.step >= output.total_steps and held.denoising:
                    held.denoising = False
                    if self._backlog:  # else a pull now would only delay this task's finish
                        self._wake.set()
                if held.wants_progress and held.record is not None and held.task is not None:
                    self.state.progress(held.record, output.percent, live=held.task.includeProgress)
                continue
            if held.denoising:
                self._wake.set()
            if isinstance(output, EngineError) and output.code is ErrorCode.ABORTED and self._stopping:
                self.held.pop(held.task_uuid, None)
                continue  # shutting down: left in the queue for another worker
            self._spawn(self._complete(held, output))

    async def _complete(self, held: _Held, output: UpscaleResult | EngineError) -> None:
        assert held.task is not None
        logs.TASK_UUID.set(held.task_uuid)  # a task of its own: no reset needed
        # Images in Redis: the output image is written with the outcome (see Completion.outcome).
        unsaved: list | None = [] if self.images_in_redis else None
        try:
            item = await self.completion.outcome(
                held.task, output, held.input_uuid, held.base_url, unsaved=unsaved
            )
        except TaskError as error:
            error = error.for_task(held.task.taskType, held.task_uuid)
            await self._finish(held, error=error, image=unsaved[0] if unsaved else None)
        except Exception:
            logger.exception("completing task %s failed", held.task_uuid)
            await self._finish(held, error=internal_error(held.task.taskType, held.task_uuid))
        else:
            await self._finish(held, item=item, image=unsaved[0] if unsaved else None)

    def _end(self, held: _Held, error: TaskError) -> None:
        task_type = held.task.taskType if held.task else None
        self._spawn(self._finish(held, error=error.for_task(task_type, held.task_uuid)))

    async def _finish(
        self,
        held: _Held,
        *,
        item: dict | None = None,
        error: TaskError | None = None,
        image: StoredImage | None = None,
    ) -> None:
        """``FINISH`` (exactly once, whoever is first), retried while Redis is away;
        ``image`` (the output) is written in the same step."""
        assert held.record is not None
        webhook = held.task.webhookURL if held.task else None
        ttl = self.completion.ttl_of(held.task) if held.task else None
        delay = 0.2
        try:
            while True:
                try:
                    finished = self.state.finish(
                        held.record, item=item, error=error, webhook=webhook, image=image, payload_ttl=ttl
                    )
                    if await finished:
                        self._ended(held, error)
                    return
                except ClusterUnavailable as exc:
                    if self._stopping:
                        return
                    logger.warning("task %s not recorded yet (%s); retrying", held.task_uuid, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        finally:
            self.held.pop(held.task_uuid, None)
            if not self.held:  # idle: pull, and be registered idle if there is nothing
                self._wake.set()

    def _ended(self, held: _Held, error: TaskError | None) -> None:
        """Count a task this worker ended, and write its line. Its latency runs from
        when it was queued (Redis's clock) to now (this worker's)."""
        assert held.record is not None
        total = max(0.0, time.time() - held.queued_at)
        self.ends.ended(
            held.task_uuid,
            held.record.task_type,
            held.record.session.session_id,
            code=None if error is None else error.code,
            deliver_async=held.record.deliver_async,
            total=total,
            before_engine=None if held.submitted is None else total - (time.monotonic() - held.submitted),
            queued=max(0.0, held.began - held.queued_at) if held.began else None,
        )

    # Refresh and reap

    async def _refresh_loop(self) -> None:
        # Twice per claim timeout: a live worker's entries never reach it (a margin of half
        # of it), and a dead one's become claimable on average a quarter of it sooner.
        every = max(0.2, self.cluster.claim_timeout / 2)
        while True:
            await asyncio.sleep(every)
            try:
                await self._refresh()
            except ClusterUnavailable as exc:
                logger.debug("refresh skipped: %s", exc)
            except Exception:
                logger.exception("refreshing held entries failed")

    async def _heartbeat(self) -> None:
        """This worker is alive for another claim timeout (a silent one loses its tasks)."""
        alive_ms = int(self.cluster.claim_timeout * 1000)
        with contextlib.suppress(ClusterUnavailable):
            await guarded(self.link.redis.set(keys.alive("worker", self.id), b"1", px=alive_ms))

    async def _refresh(self) -> None:
        await self._heartbeat()
        queues = sorted({keys.queue(h.shape) for h in self.held.values()})
        if not queues:
            return
        before = list(self.held.values())
        mine = {entry.decode() for entry in await self.link.script("REFRESH", queues, [self.id, keys.WORKERS_GROUP])}
        lost = [h for h in before if h.entry not in mine and self.held.get(h.task_uuid) is h and h.record]
        if lost:
            logger.warning("%d tasks were taken over by another worker; dropping them here", len(lost))
            for held in lost:
                self.held.pop(held.task_uuid, None)
            await self.engine.abort([h.task_uuid for h in lost])

    async def _reap_loop(self) -> None:
        # Often: an entry is taken over as soon as it has been idle for the claim timeout.
        every = min(REAP_EVERY, self.cluster.claim_timeout / 3)
        cursors: dict[str, str] = {}
        last_cleanup = time.monotonic()
        while True:
            await asyncio.sleep(every)
            if self._stopping or not self.link.healthy:
                continue
            try:
                await self._reap(cursors)
                if time.monotonic() - last_cleanup > 60:
                    last_cleanup = time.monotonic()
                    await self._forget_dead_consumers()
            except (ClusterUnavailable, Exception) as exc:
                logger.debug("reap skipped: %s", exc)

    async def _reap(self, cursors: dict[str, str]) -> None:
        shapes = [s.decode() for s in await guarded(self.link.redis.smembers(keys.SHAPES))]
        min_idle = int(self.cluster.claim_timeout * 1000)
        for shape in shapes:
            free = self.max_rows - self._used_rows().get(shape, 0)
            if free <= 0:
                continue
            try:
                cursor, entries, _ = await guarded(
                    self.link.redis.xautoclaim(
                        keys.queue(shape),
                        keys.WORKERS_GROUP,
                        self.id,
                        min_idle,
                        start_id=cursors.get(shape, "0-0"),
                        count=free,
                    )
                )
            except ClusterUnavailable:
                cursors.pop(shape, None)  # e.g. NOGROUP after a restart
                continue
            cursors[shape] = cursor.decode() if isinstance(cursor, bytes) else cursor
            taken = [
                _Held.of(shape, entry, fields)
                for entry, fields in entries
                if fields and fields[b"t"].decode() not in self.held
            ]
            free -= sum(h.rows for h in taken)
            if free > 0:  # and the entries of workers whose heartbeat stopped
                args = [keys.WORKERS_GROUP, self.id, keys.alive("worker", ""), free]
                flat = await self.link.script("ORPHANS", [keys.queue(shape)], args)
                taken += [
                    _Held(flat[i + 1].decode(), shape, int(flat[i + 2]), flat[i].decode())
                    for i in range(0, len(flat), 3)
                    if flat[i + 1].decode() not in self.held
                ]
            if taken:
                logger.warning("taking over %d tasks of shape %s from a silent worker", len(taken), shape)
                await self._take_over(taken)

    async def _forget_dead_consumers(self) -> None:
        idle_limit = FORGET_CONSUMERS_AFTER * self.cluster.claim_timeout * 1000
        for shape in [s.decode() for s in await guarded(self.link.redis.smembers(keys.SHAPES))]:
            queue = keys.queue(shape)
            for consumer in await guarded(self.link.redis.xinfo_consumers(queue, keys.WORKERS_GROUP)):
                name = consumer["name"].decode() if isinstance(consumer["name"], bytes) else consumer["name"]
                if name != self.id and consumer["pending"] == 0 and consumer["idle"] > idle_limit:
                    await guarded(self.link.redis.xgroup_delconsumer(queue, keys.WORKERS_GROUP, name))

    def stats(self) -> dict:
        """What ``/stats`` on the worker's HTTP port shows."""
        used = self._used_rows()
        return {
            "worker": self.id,
            "engine": self.engine.stats().as_dict(),
            "held": len(self.held),
            "held_rows": sum(used.values()),
            "redelivered": self.redelivered,
            "pushed": self.pushed,
            "dead_lettered": self.dead_lettered,
            "inputs_read": self.inputs_read,
            **({"image_store": store} if (store := self.store.stats()) else {}),
        }
