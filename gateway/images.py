"""The image store: uploaded, input and generated images by UUID, each with a TTL.

Behind a small async interface (:class:`ImageStore`) so that a shared store (Redis, in a
cluster: ``gateway.cluster.stores``) can replace the in-memory one. The in-memory store
keeps within a byte budget by evicting expired entries first, then the oldest; its
methods never wait, and it offers them as plain calls too (``put_now``/``get_now``).
"""

from __future__ import annotations

import abc
import heapq
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["EXTENSIONS", "ImageStore", "MemoryImageStore", "StoredImage", "new_uuid"]

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


class ImageStore(abc.ABC):
    #: ``expires_at`` of the images it returns is on this clock (``time.monotonic``
    #: for the in-memory store; wall-clock ``time.time`` for shared stores).
    clock: Callable[[], float]

    @abc.abstractmethod
    async def put(self, data: bytes, media_type: str, ttl: float, image_uuid: str | None = None) -> StoredImage:
        """Store ``data`` for ``ttl`` seconds under a new (or the given) UUID."""

    @abc.abstractmethod
    async def get(self, image_uuid: str) -> StoredImage | None:
        """The image, or None if unknown or expired."""

    async def close(self) -> None:
        """Release connections (nothing to do for the in-memory store)."""
        return None


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
