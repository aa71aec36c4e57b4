"""Webhooks of a cluster, posted from a durable queue by any gateway.

``FINISH`` appends a finished task's webhook to the ``lu:hooks`` stream in the same
step that records its outcome, so a webhook outlives whichever process finished the
task. Every gateway reads the stream in the consumer group ``gateways``, posts each
entry (with the outbound retry policy), then acknowledges and deletes it. Entries a
dead gateway held are claimed by another after ``claim_timeout`` (``XAUTOCLAIM``,
keeping its cursor); while a gateway is still posting an entry it keeps the entry's
idle time fresh, so a slow receiver does not get the same webhook from two gateways.
Receivers de-duplicate on ``taskUUID`` anyway (PROTOCOL.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import orjson
from redis.exceptions import ResponseError

from . import keys
from .link import ClusterUnavailable, RedisLink, cancel_all, guarded

__all__ = ["WebhookQueue"]

logger = logging.getLogger(__name__)

Post = Callable[[str, dict], Awaitable[bool]]
CONCURRENCY = 16  # webhooks posted at once by one gateway


class WebhookQueue:
    def __init__(self, link: RedisLink, post: Post, *, consumer: str, claim_timeout: float) -> None:
        self.link = link
        self.post = post
        self.consumer = consumer
        self.claim_timeout = claim_timeout
        self._posting: set[bytes] = set()  # entry ids being posted now
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._tasks: list[asyncio.Task] = []
        self._jobs: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._read(), name="webhooks-read"),
            asyncio.create_task(self._reclaim(), name="webhooks-reclaim"),
        ]

    async def close(self) -> None:
        await cancel_all([*self._tasks, *self._jobs])

    async def _ensure_group(self) -> None:
        with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
            await self.link.redis.xgroup_create(keys.HOOKS, keys.GATEWAYS_GROUP, id="0", mkstream=True)

    async def _read(self) -> None:
        delay = 0.2
        while True:
            try:
                await guarded(self._ensure_group())
                while True:
                    await self._slots.acquire()
                    self._slots.release()
                    got = await guarded(
                        self.link.redis.xreadgroup(
                            keys.GATEWAYS_GROUP, self.consumer, {keys.HOOKS: ">"}, count=CONCURRENCY, block=1000
                        )
                    )
                    for _, entries in got or []:
                        for entry_id, fields in entries:
                            await self._dispatch(entry_id, fields)
                    delay = 0.2
            except ClusterUnavailable as exc:
                logger.debug("webhook queue unreachable (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _reclaim(self) -> None:
        """Take over entries of gateways that died while posting them, and keep the idle
        time of what this gateway is posting fresh."""
        cursor = "0-0"
        every = max(0.5, self.claim_timeout / 3)
        while True:
            await asyncio.sleep(every)
            try:
                if self._posting:
                    await guarded(
                        self.link.redis.xclaim(
                            keys.HOOKS, keys.GATEWAYS_GROUP, self.consumer, 0, list(self._posting), justid=True
                        )
                    )
                cursor, entries, _ = await guarded(
                    self.link.redis.xautoclaim(
                        keys.HOOKS,
                        keys.GATEWAYS_GROUP,
                        self.consumer,
                        int(self.claim_timeout * 1000),
                        start_id=cursor,
                        count=CONCURRENCY,
                    )
                )
                for entry_id, fields in entries:
                    if fields:  # None: deleted meanwhile
                        await self._dispatch(entry_id, fields)
            except (ClusterUnavailable, ResponseError) as exc:
                logger.debug("webhook reclaim skipped: %s", exc)
                cursor = "0-0"

    async def _dispatch(self, entry_id: bytes, fields: dict) -> None:
        if entry_id in self._posting:
            return
        await self._slots.acquire()
        self._posting.add(entry_id)
        job = asyncio.create_task(self._deliver(entry_id, fields))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _deliver(self, entry_id: bytes, fields: dict) -> None:
        try:
            url, body = fields[b"u"].decode(), orjson.loads(fields[b"b"])
            await self.post(url, body)  # it logs a webhook that never got through
        except Exception:
            logger.exception("posting webhook entry %s failed", entry_id)
        finally:
            self._slots.release()
            self._posting.discard(entry_id)
        # Posted (or given up on after its retries): it leaves the queue.
        with contextlib.suppress(ClusterUnavailable):
            async with self.link.redis.pipeline(transaction=True) as pipe:
                pipe.xack(keys.HOOKS, keys.GATEWAYS_GROUP, entry_id)
                pipe.xdel(keys.HOOKS, entry_id)
                await guarded(pipe.execute())
