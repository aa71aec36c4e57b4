"""The image store on Redis: every gateway and worker of a cluster sees every image.

Each image is one hash (``lu:img:{uuid}``: media type and bytes) whose TTL is the
image's lifetime, so Redis itself forgets expired images. ``expires_at`` is wall-clock
time (``time.time``), the one clock all machines share.

With ``--image-store s3://…`` the images are in S3 instead (``gateway.objectstore``) and
Redis keeps only their expiry index (:class:`RedisExpiryIndex`).
"""

from __future__ import annotations

import logging
import time

from ..images import ImageStore, StoredImage, new_uuid
from ..objectstore import ExpiryIndex
from . import keys
from .link import ClusterUnavailable, RedisLink, guarded

__all__ = ["RedisExpiryIndex", "RedisImageStore", "put_image"]

logger = logging.getLogger(__name__)


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


class RedisExpiryIndex(ExpiryIndex):
    """A cluster's index of the images in S3 (``--image-store s3://…``): one sorted set,
    ``lu:img-expiry``, of UUIDs scored by their expiry (wall-clock seconds), shared by
    every gateway and worker; ``IMAGES_DUE`` hands each expired image to one of them.

    While Redis is away, images are still written and read (their objects carry their
    expiry): an image not indexed then is left to the bucket's lifecycle rule."""

    def __init__(self, link: RedisLink) -> None:
        self.link = link

    async def add(self, name: str, expires_at: float) -> None:
        try:
            await guarded(self.link.redis.zadd(keys.IMAGE_EXPIRY, {name: expires_at}))
        except ClusterUnavailable as exc:
            logger.warning("image %s not indexed for deletion (%s): the lifecycle rule deletes it", name, exc)

    async def expires_at(self, name: str) -> float | None:
        try:
            return await guarded(self.link.redis.zscore(keys.IMAGE_EXPIRY, name))
        except ClusterUnavailable:
            return None  # the caller asks the object itself

    async def take_due(self, now: float, limit: int) -> list[tuple[str, float]]:
        flat = await self.link.script("IMAGES_DUE", [keys.IMAGE_EXPIRY], [repr(now), limit])
        return [(name.decode(), float(score)) for name, score in zip(flat[::2], flat[1::2])]

    async def put_back(self, entries: list[tuple[str, float]]) -> None:
        if entries:  # GT: an expiry moved later meanwhile (the image was stored again) stays
            await guarded(self.link.redis.zadd(keys.IMAGE_EXPIRY, dict(entries), gt=True))
