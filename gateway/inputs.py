"""Input images: a stored image's UUID, a data URI, raw base64 or an http(s) URL in,
the stored image out (a new input is stored, so later tasks can reuse it by its UUID).

The only I/O is the image store and, for a URL, the download through :class:`Outbound`
(behind the SSRF guard); every refusal is an ``invalidInputImage`` error naming the
field it came from.
"""

from __future__ import annotations

import binascii
import uuid

from engine import codecs

from .errors import TaskError
from .http import Outbound, OutboundError
from .images import ImageStore, StoredImage, new_uuid

__all__ = ["Inputs", "is_url", "is_uuid"]


class Inputs:
    def __init__(self, store: ImageStore, outbound: Outbound, *, max_bytes: int, ttl: float) -> None:
        self.store = store
        self.outbound = outbound
        self.max_bytes = max_bytes  # largest input, inline or fetched
        self.ttl = ttl  # how long a new input stays reusable by its UUID

    async def resolve(self, value: str, field: str) -> StoredImage:
        """The stored input given as a stored UUID, data URI, URL or raw base64."""
        if not is_url(value):
            return await self.resolve_local(value, field)
        return await self.store_new(await self._fetch(value, field))

    async def resolve_local(self, value: str, field: str) -> StoredImage:
        """:meth:`resolve` for anything but a URL: no I/O beyond the image store."""
        if is_uuid(value):
            stored = await self.store.get(value)
            if stored is None:
                raise TaskError(
                    "invalidInputImage",
                    f"image {value} is unknown or has expired; upload it again",
                    parameter=field,
                    type="string",
                )
            return stored
        data, media_type = decode_inline(value, field, self.max_bytes)
        return await self.store_new(data, media_type)

    def prepare_inline(self, value: str, field: str) -> StoredImage:
        """An inline input decoded, with the UUID and expiry it will be stored under
        (by the caller: see ``GatewayState.register``'s ``admit``)."""
        data, media_type = decode_inline(value, field, self.max_bytes)
        return StoredImage(new_uuid(), data, _media_type(data, media_type), self.store.clock() + self.ttl)

    async def store_new(self, data: bytes, media_type: str | None = None) -> StoredImage:
        """Store an input; ``media_type`` is what its bytes were sniffed as, if that was done."""
        return await self.store.put(data, _media_type(data, media_type), self.ttl)

    async def _fetch(self, url: str, field: str) -> bytes:
        try:
            data, _ = await self.outbound.fetch(url, max_bytes=self.max_bytes)
        except OutboundError as exc:
            message = f"could not use the image URL: {exc}"
            raise TaskError("invalidInputImage", message, parameter=field, type="string") from exc
        return data


def _media_type(data: bytes, sniffed: str | None) -> str:
    """What an input is stored as: what its bytes were sniffed as, sniffing them if that
    was not done."""
    return sniffed or codecs.sniff_media_type(data) or "application/octet-stream"


def is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def is_uuid(value: str) -> bool:
    if len(value) != 36:
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def decode_inline(value: str, field: str, max_bytes: int) -> tuple[bytes, str | None]:
    """The bytes of a data URI or raw base64, and the media type they were sniffed as."""
    declared = None
    if value.startswith("data:"):
        header, sep, value = value.partition(",")
        if not sep or not header.endswith(";base64"):
            raise TaskError(
                "invalidInputImage",
                "a data URI must look like data:image/png;base64,<data>",
                parameter=field,
                type="string",
            )
        declared = header[5:-7].lower()
        if not declared.startswith("image/"):
            raise TaskError(
                "invalidInputImage",
                f"the data URI's media type {declared!r} is not an image type",
                parameter=field,
                type="string",
            )
    if len(value) > max_bytes * 4 // 3 + 4:
        raise TaskError(
            "invalidInputImage", f"the image is over {max_bytes} bytes", parameter=field, type="string"
        )
    try:
        data = binascii.a2b_base64(value, strict_mode=True)  # validates as it decodes
    except (binascii.Error, ValueError) as exc:
        raise TaskError(
            "invalidInputImage",
            "inputImage is not an image UUID, a data URI, an http(s) URL or valid base64",
            parameter=field,
            type="string",
        ) from exc
    if not data:
        raise TaskError("invalidInputImage", "the image is empty", parameter=field, type="string")
    sniffed = codecs.sniff_media_type(data)
    if declared and sniffed and sniffed != declared and declared != "image/jpg":
        raise TaskError(
            "invalidInputImage",
            f"the data URI says {declared} but the data is {sniffed}",
            parameter=field,
            type="string",
        )
    return data, sniffed
