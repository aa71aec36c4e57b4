"""The image store: uploaded, input and generated images by UUID, each with a TTL.

Behind a small interface (:class:`ImageStore`) so that a shared store can replace the
in-memory one when the gateway runs on several machines. The in-memory store keeps
within a byte budget by evicting expired entries first, then the oldest.
"""

from __future__ import annotations

import abc
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["EXTENSIONS", "ImageStore", "MemoryImageStore", "StoredImage"]

EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}


@dataclass(frozen=True, slots=True)
class StoredImage:
    image_uuid: str
    data: bytes
    media_type: str
    expires_at: float

    @property
    def extension(self) -> str:
        return EXTENSIONS.get(self.media_type, "bin")


class ImageStore(abc.ABC):
    @abc.abstractmethod
    def put(self, data: bytes, media_type: str, ttl: float, image_uuid: str | None = None) -> StoredImage:
        """Store ``data`` for ``ttl`` seconds under a new (or the given) UUID."""

    @abc.abstractmethod
    def get(self, image_uuid: str) -> StoredImage | None:
        """The image, or None if unknown or expired."""


class MemoryImageStore(ImageStore):
    def __init__(self, max_bytes: int = 2 * 2**30, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self._clock = clock
        self._images: OrderedDict[str, StoredImage] = OrderedDict()  # insertion order = age
        self.bytes = 0
        self._swept = clock()

    def put(self, data: bytes, media_type: str, ttl: float, image_uuid: str | None = None) -> StoredImage:
        image = StoredImage(image_uuid or str(uuid.uuid4()), data, media_type, self._clock() + ttl)
        self._drop(image.image_uuid)
        self._images[image.image_uuid] = image
        self.bytes += len(data)
        self._evict()
        return image

    def get(self, image_uuid: str) -> StoredImage | None:
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
        """Expired images go at least once a second; over the budget, expired then oldest."""
        now = self._clock()
        if self.bytes <= self.max_bytes and now - self._swept < 1.0:
            return
        self._swept = now
        for key in [k for k, v in self._images.items() if v.expires_at <= now]:
            self._drop(key)
        while self.bytes > self.max_bytes and len(self._images) > 1:
            self._drop(next(iter(self._images)))
