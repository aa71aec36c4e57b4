"""The cluster's queue as a cluster gateway's metrics see it, read in the background.

Every ``every`` seconds (default 5) one pipeline reads, per shape in ``lu:shapes``, the
length of its queue (``XLEN``) and the entries workers hold (the ``XPENDING`` summary of
the ``workers`` group), plus Redis's memory; a ``SCAN`` (never ``KEYS``) counts the
live workers' ``lu:alive:worker:*`` keys. A scrape reads the last snapshot and never
waits for Redis; a snapshot older than three periods is not exported at all (an
autoscaler then sees no data, rather than a stale backlog).

Every gateway exports the same cluster-wide numbers: aggregate them with ``max``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from . import keys
from .link import ClusterUnavailable, RedisLink, cancel_all, guarded

__all__ = ["ClusterMonitor", "ClusterSnapshot"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    at: float  # time.monotonic() of the read
    backlog: dict[str, int] = field(default_factory=dict)  # shape → entries no worker has taken
    held: dict[str, int] = field(default_factory=dict)  # shape → entries workers hold, unfinished
    workers: int = 0  # live workers (their liveness key has not expired)
    redis_memory_bytes: int | None = None


class ClusterMonitor:
    """``await monitor.start()``; :meth:`current` is the last fresh snapshot (or None)."""

    def __init__(self, link: RedisLink, every: float = 5.0) -> None:
        self.link = link
        self.every = every
        self.snapshot: ClusterSnapshot | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="cluster-monitor")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_all([self._task])

    def current(self) -> ClusterSnapshot | None:
        snapshot = self.snapshot
        if snapshot is None or time.monotonic() - snapshot.at > 3 * self.every:
            return None
        return snapshot

    async def _loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.every):
                    self.snapshot = await self.read()
            except (ClusterUnavailable, RedisError, OSError, TimeoutError) as exc:
                logger.debug("cluster metrics not refreshed: %s", exc)
            except Exception:
                logger.exception("reading the cluster's metrics failed")
            await asyncio.sleep(self.every)

    async def read(self) -> ClusterSnapshot:
        """One read of the queues, the live workers and Redis's memory."""
        redis = self.link.redis
        shapes = sorted(s.decode() for s in await guarded(redis.smembers(keys.SHAPES)))
        async with redis.pipeline(transaction=False) as pipe:
            for shape in shapes:
                pipe.xlen(keys.queue(shape))
                pipe.xpending(keys.queue(shape), keys.WORKERS_GROUP)
            pipe.info("memory")
            answers = await guarded(pipe.execute(raise_on_error=False))
        backlog, held = {}, {}
        for i, shape in enumerate(shapes):
            length, pending = answers[2 * i], answers[2 * i + 1]
            length = length if isinstance(length, int) else 0
            # No group yet (NOGROUP) or an error: nothing is held.
            taken = pending.get("pending", 0) if isinstance(pending, dict) else 0
            backlog[shape], held[shape] = max(0, length - taken), taken
        memory = answers[-1].get("used_memory") if isinstance(answers[-1], dict) else None
        workers = 0
        async for _ in redis.scan_iter(match=keys.alive("worker", "*"), count=1000):
            workers += 1
        return ClusterSnapshot(time.monotonic(), backlog, held, workers, memory)
