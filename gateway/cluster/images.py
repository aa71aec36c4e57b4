"""The image store on Redis: every gateway and worker of a cluster sees every image.

Each image is one hash (``lu:img:{uuid}``: media type and bytes) whose TTL is the
image's lifetime, so Redis itself forgets expired images. ``expires_at`` is wall-clock
time (``time.time``), the one clock all machines share.
"""

from __future__ import annotations

import time

from ..images import ImageStore, StoredImage, new_uuid
from . import keys
from .link import RedisLink, guarded

__all__ = ["RedisImageStore"]


class RedisImageStore(ImageStore):
    clock = staticmethod(time.time)

    def __init__(self, link: RedisLink) -> None:
        self.link = link

    async def put(self, data: bytes, media_type: str, ttl: float, image_uuid: str | None = None) -> StoredImage:
        image_uuid = image_uuid or new_uuid()
        ttl_ms = max(1, int(ttl * 1000))
        key = keys.image(image_uuid)
        async with self.link.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"t": media_type, "d": data})
            pipe.pexpire(key, ttl_ms)
            await guarded(pipe.execute())
        return StoredImage(image_uuid, data, media_type, time.time() + ttl)

    async def get(self, image_uuid: str) -> StoredImage | None:
        key = keys.image(image_uuid)
        async with self.link.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(key, ["t", "d"])
            pipe.pttl(key)
            (media_type, data), ttl_ms = await guarded(pipe.execute())
        if media_type is None or data is None or ttl_ms <= 0:
            return None
        return StoredImage(image_uuid, data, media_type.decode(), time.time() + ttl_ms / 1000)
