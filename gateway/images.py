"""The image store: uploaded, input and generated images by UUID, each with a TTL.

Behind a small async interface (:class:`ImageStore`) so that a shared store can replace
the in-memory one: Redis in a cluster (``gateway.cluster.images``), or S3-compatible
object storage (``gateway.objectstore``). The in-memory store keeps within a byte budget
by evicting expired entries first, then the oldest; its methods never wait, and it
offers them as plain calls too (``put_now``/``get_now``).

``GET /images/…`` reads an image with :meth:`ImageStore.open`: the whole image
(:attr:`OpenedImage.data`) from a store that holds it in memory, or its bytes as they
arrive (:attr:`OpenedImage.chunks`) from an object store, so that a large image is
never copied whole into the gateway's memory.
"""

from __future__ import annotations

import abc
import heapq
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .cluster.link import RedisLink
    from .config import ImageStoreConfig

__all__ = [
    "EXTENSIONS",
    "ImageStore",
    "MemoryImageStore",
    "OpenedImage",
    "StoredImage",
    "image_store",
    "new_uuid",
]

EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}
_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


def new_uuid() -> str:
    """A random (version 4) UUID string from the OS's CSPRNG.

    Image UUIDs are capabilities (``GET /images/{uuid}`` needs nothing else), so they
    must be unguessable; this is ``str(uuid.uuid4())`` at a quarter of its cost, which
    matters at two per task.
    """
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


class StoredImage(NamedTuple):  # immutable, and cheaper to build than a frozen dataclass
    image_uuid: str
    data: bytes
    media_type: str
    expires_at: float

    @property
    def extension(self) -> str:
        return EXTENSIONS.get(self.media_type, "bin")


@dataclass(eq=False)
class OpenedImage:
    """An image being read for ``GET /images/…``: either ``data`` (the whole image), or
    ``length`` bytes arriving from ``chunks``; whoever opened it calls :meth:`aclose`
    whether or not it read to the end."""

    image_uuid: str
    media_type: str
    expires_at: float
    length: int
    data: bytes | None = None
    chunks: AsyncIterator[bytes] | None = None
    release: Callable[[], Awaitable[None]] | None = None

    @property
    def extension(self) -> str:
        return EXTENSIONS.get(self.media_type, "bin")

    async def aclose(self) -> None:
        if self.release is not None:
            release, self.release = self.release, None
            await release()


class ImageStore(abc.ABC):
    #: ``expires_at`` of the images it returns is on this clock (``time.monotonic``
    #: for the in-memory store; wall-clock ``time.time`` for shared stores).
    clock: Callable[[], float]
    #: Whether ``GET /images/…`` redirects to a URL of the store (:meth:`presigned_url`).
    presigns: bool = False

    @abc.abstractmethod
    async def put(self, data: bytes, media_type: str, ttl: float, image_uuid: str | None = None) -> StoredImage:
        """Store ``data`` for ``ttl`` seconds under a new (or the given) UUID."""

    @abc.abstractmethod
    async def get(self, image_uuid: str) -> StoredImage | None:
        """The image, or None if unknown or expired."""

    async def start(self) -> None:
        """Check the store and begin its background work (nothing for the in-memory store).
        Raises ValueError for a store that cannot work as configured."""
        return None

    async def close(self) -> None:
        """Release connections (nothing to do for the in-memory store)."""
        return None

    async def open(self, image_uuid: str) -> OpenedImage | None:
        """The image for ``GET /images/…``, or None if unknown or expired."""
        image = await self.get(image_uuid)
        if image is None:
            return None
        size = len(image.data)
        return OpenedImage(image.image_uuid, image.media_type, image.expires_at, size, data=image.data)

    async def presigned_url(self, image_uuid: str) -> str | None:
        """A URL of the store itself that serves the image until it expires (stores that
        presign), or None if unknown or expired."""
        return None

    async def public_url(self, image: StoredImage) -> str | None:
        """The ``imageURL`` of an image just stored, when the store serves it itself
        (a presigned URL); None means the gateway's own ``/images/…`` URL."""
        return None

    def stats(self) -> dict:
        """Counters for ``GET /stats`` (none for the in-memory store)."""
        return {}


class MemoryImageStore(ImageStore):
    def __init__(self, max_bytes: int = 2 * 2**30, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.clock = self._clock = clock
        self._images: OrderedDict[str, StoredImage] = OrderedDict()  # insertion order = age
        # (expires_at, uuid) of every put, soonest first: expiry never scans the whole store.
        # Entries whose image has gone (or was replaced) are skipped when they surface.
        self._expiry: list[tuple[float, str]] = []
        self.bytes = 0
        self._swept = clock()

    async def put(self, data: bytes, media_type: str, ttl: float, image_uuid: str | None = None) -> StoredImage:
        return self.put_now(data, media_type, ttl, image_uuid)

    async def get(self, image_uuid: str) -> StoredImage | None:
        return self.get_now(image_uuid)

    def put_now(self, data: bytes, media_type: str, ttl: float, image_uuid: str | None = None) -> StoredImage:
        image = StoredImage(image_uuid or new_uuid(), data, media_type, self._clock() + ttl)
        self._drop(image.image_uuid)
        self._images[image.image_uuid] = image
        self.bytes += len(data)
        heapq.heappush(self._expiry, (image.expires_at, image.image_uuid))
        self._evict()
        return image

    def get_now(self, image_uuid: str) -> StoredImage | None:
        image = self._images.get(image_uuid)
        if image is None:
            return None
        if image.expires_at <= self._clock():
            self._drop(image_uuid)
            return None
        return image

    def __len__(self) -> int:
        return len(self._images)

    def _drop(self, image_uuid: str) -> None:
        old = self._images.pop(image_uuid, None)
        if old is not None:
            self.bytes -= len(old.data)

    def _evict(self) -> None:
        """Expired images go at least once a second; over the budget, expired then oldest.
        Each sweep costs O(k log n) for the k images that expired, not O(n)."""
        now = self._clock()
        if self.bytes <= self.max_bytes and now - self._swept < 1.0:
            return
        self._swept = now
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            expires_at, key = heapq.heappop(expiry)
            image = self._images.get(key)
            if image is not None and image.expires_at == expires_at:
                self._drop(key)
        while self.bytes > self.max_bytes and len(self._images) > 1:
            self._drop(next(iter(self._images)))
        if len(expiry) > 2 * len(self._images) + 1024:  # mostly stale entries: rebuild
            self._expiry = [(v.expires_at, k) for k, v in self._images.items()]
            heapq.heapify(self._expiry)


def image_store(
    config: ImageStoreConfig,
    *,
    link: RedisLink | None = None,
    max_bytes: int = 2 * 2**30,
    clock: Callable[[], float] = time.monotonic,
) -> ImageStore:
    """The store ``--image-store`` names: in ``serve`` (no ``link``) memory or S3 with an
    in-memory expiry index; in a cluster (the cluster's Redis ``link``) Redis, or S3
    with its expiry index on Redis. Raises ValueError for a store the role cannot share."""
    if config.kind == "s3":
        from .objectstore import S3ImageStore

        if link is None:
            return S3ImageStore(config)
        from .cluster.images import RedisExpiryIndex

        return S3ImageStore(config, RedisExpiryIndex(link))
    if link is None:
        if config.kind == "redis":
            raise ValueError(
                "--image-store redis is for a cluster (latent-upscaler gateway/worker); serve keeps images "
                "in memory or in S3 (s3://BUCKET/PREFIX)"
            )
        return MemoryImageStore(max_bytes, clock)
    if config.kind == "memory":
        raise ValueError(
            "--image-store memory cannot be shared by a cluster's gateways and workers: use redis "
            "(the default) or s3://BUCKET/PREFIX, the same on every gateway and worker"
        )
    from .cluster.images import RedisImageStore

    return RedisImageStore(link)
