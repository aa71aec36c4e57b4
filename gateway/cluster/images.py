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

__all__ = ["RedisImageStore", "put_image"]


def put_image(pipe, image: StoredImage) -> None:
    """Queue the writes that store ``image`` (until its ``expires_at``) on a pipeline."""
    key = keys.image(image.image_uuid)
    pipe.hset(key, mapping={"t": image.media_type, "d": image.data})
    pipe.pexpire(key, max(1, int((image.expires_at - time.time()) * 1000)))


class RedisImageStore(ImageStore):
    clock = staticmethod(time.time)

    def __init__(self, link: RedisLink) -> None:
        self.link = link

    async def put(self, data: bytes, media_type: str, ttl: float, image_uuid: str | None = None) -> StoredImage:
        image = StoredImage(image_uuid or new_uuid(), data, media_type, time.time() + ttl)
        async with self.link.redis.pipeline(transaction=True) as pipe:
            put_image(pipe, image)
            await guarded(pipe.execute())
        return image

    async def get(self, image_uuid: str) -> StoredImage | None:
        key = keys.image(image_uuid)
        async with self.link.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(key, ["t", "d"])
            pipe.pttl(key)
            (media_type, data), ttl_ms = await guarded(pipe.execute())
        if media_type is None or data is None or ttl_ms <= 0:
            return None
        return StoredImage(image_uuid, data, media_type.decode(), time.time() + ttl_ms / 1000)
