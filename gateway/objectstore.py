"""Images in S3-compatible object storage: ``--image-store s3://BUCKET/PREFIX``.

For S3 itself and what speaks its API (R2, GCS's XML API, Ceph RGW, MinIO, SeaweedFS,
Garage), in ``serve`` and in a cluster, where Redis's memory should not hold an hour of
outputs. :class:`S3ImageStore` is an :class:`~gateway.images.ImageStore`:

- **Objects**: ``PREFIX/UUID``, written with their media type (``Content-Type``) and their
  expiry (wall-clock seconds) as user metadata (``x-amz-meta-expires-at``).
- **Expiry**: lifecycle rules expire whole days only, and TTLs are minutes to hours, so
  each image's expiry is also kept in an :class:`ExpiryIndex` (in memory in ``serve``; a
  Redis sorted set in a cluster, ``gateway.cluster.images.RedisExpiryIndex``). An expired
  image is refused at once (its metadata says so, or the in-memory index before any
  request), and deleted in the background: every second, whoever runs a store takes
  the due entries off the index (each once) and deletes them in bulk. A lifecycle rule
  on the prefix is the backstop for what no index remembers (a ``serve`` restarted).
- **Reading** for ``GET /images/…`` (:meth:`S3ImageStore.open`): a small image whole,
  a large one as its bytes arrive, never wholly in memory; with ``--s3-presign``, a
  presigned URL instead, valid until the image expires (and that is ``imageURL`` too).
- **Failures**: every call is bounded (``--s3-timeout``, retries included); transient
  errors (5xx, connection errors, time-outs of reads) are retried with exponential
  backoff and jitter by the client. What still fails raises a ``serviceUnavailable``
  :class:`~gateway.errors.TaskError` naming the store, which the affected task (or
  ``GET``: 503) gets; nothing waits longer, and the rest of the server goes on.
- **Outbound safety**: the endpoint is the operator's, reached by this client directly;
  the SSRF guard of :mod:`gateway.http` (which would refuse a private address) applies
  to URLs that clients send, and still refuses this endpoint when a task names it.
- **Credentials**: the standard AWS variables (``AWS_ACCESS_KEY_ID``, …,
  ``AWS_WEB_IDENTITY_TOKEN_FILE``, container and instance roles), else the static keys
  of ``AWS_PROFILE`` in the shared credentials file; never a flag.

The client is obstore (Rust's ``object_store``), picked by measurement over aiobotocore:
``benchmarks/s3_clients.py``, README.
"""

from __future__ import annotations

import abc
import asyncio
import configparser
import heapq
import logging
import math
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from datetime import timedelta
from pathlib import Path

from .config import ImageStoreConfig
from .errors import TaskError
from .images import ImageStore, OpenedImage, StoredImage, new_uuid
from .inputs import is_uuid

__all__ = ["ExpiryIndex", "MemoryExpiryIndex", "S3ImageStore", "store_unavailable"]

logger = logging.getLogger(__name__)

META_EXPIRES = "expires-at"  # user metadata: x-amz-meta-expires-at
REAP_EVERY = 1.0  # seconds between looks for expired images to delete
REAP_BATCH = 1000  # keys per bulk delete (S3's limit)
READ_WHOLE_BELOW = 256 * 1024  # bytes: smaller images are read whole for GET /images
CHUNK = 256 * 1024  # bytes per streamed piece
MAX_PRESIGN = 7 * 24 * 3600  # seconds: SigV4's limit on a presigned URL
STREAM_TIMEOUT = "600s"  # one request's limit, a streamed GET to a slow reader included
RETRIES = 3
CLOSE_SETTLE = 0.05  # seconds close() leaves obstore's threads to finish waking the loop


def store_unavailable(reason: str) -> TaskError:
    return TaskError("serviceUnavailable", f"the image store (S3) {reason}; try again shortly")


class ExpiryIndex(abc.ABC):
    """Each stored image's expiry (wall-clock seconds), so that expired ones are found
    and deleted without listing the bucket."""

    @abc.abstractmethod
    async def add(self, name: str, expires_at: float) -> None: ...

    @abc.abstractmethod
    async def expires_at(self, name: str) -> float | None:
        """When ``name`` expires, or None if the index does not know it."""

    @abc.abstractmethod
    async def take_due(self, now: float, limit: int) -> list[tuple[str, float]]:
        """Up to ``limit`` entries due by ``now``, removed from the index (each is handed
        to one caller, whichever process asks)."""

    @abc.abstractmethod
    async def put_back(self, entries: list[tuple[str, float]]) -> None:
        """Entries whose deletion failed, to be taken again later."""

    def cached(self, name: str) -> float | None:
        """The expiry if the index knows it without I/O (an in-memory index), else None."""
        return None


class MemoryExpiryIndex(ExpiryIndex):
    """``serve``'s index: a dict and a heap of (expiry, name), soonest first."""

    def __init__(self) -> None:
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    async def add(self, name: str, expires_at: float) -> None:
        self._expiry[name] = expires_at
        heapq.heappush(self._heap, (expires_at, name))

    async def expires_at(self, name: str) -> float | None:
        return self._expiry.get(name)

    def cached(self, name: str) -> float | None:
        return self._expiry.get(name)

    async def take_due(self, now: float, limit: int) -> list[tuple[str, float]]:
        due: list[tuple[str, float]] = []
        while self._heap and self._heap[0][0] <= now and len(due) < limit:
            expires_at, name = heapq.heappop(self._heap)
            if self._expiry.get(name) == expires_at:  # else replaced by a later put
                del self._expiry[name]
                due.append((name, expires_at))
        return due

    async def put_back(self, entries: list[tuple[str, float]]) -> None:
        for name, expires_at in entries:
            self._expiry.setdefault(name, expires_at)
            heapq.heappush(self._heap, (self._expiry[name], name))


class S3ImageStore(ImageStore):
    """``S3ImageStore(config, index)``; ``await start()`` checks the bucket and begins
    deleting expired images; ``await close()`` at the end."""

    clock = staticmethod(time.time)

    def __init__(
        self, config: ImageStoreConfig, index: ExpiryIndex | None = None, *, reap_every: float = REAP_EVERY
    ) -> None:
        import obstore  # imported here: `serve` with the memory store never loads it

        self.obstore = obstore
        self.config = config
        self.index = index or MemoryExpiryIndex()
        self.presigns = config.presign
        self.reap_every = reap_every
        self.store = _s3_store(config)
        self.counts: Counter[str] = Counter()
        self.healthy = True  # the last call succeeded (or none failed yet)
        self._reaper: asyncio.Task | None = None

    def __repr__(self) -> str:
        return f"S3ImageStore(s3://{self.config.bucket}/{self.config.prefix})"

    # Lifecycle

    async def start(self) -> None:
        """Check that the bucket answers (a missing bucket or refused credentials stop
        the process; an unreachable store is logged and retried), then reap."""
        try:
            await self._call("list", self._list_one())
        except TaskError as exc:
            cause = exc.__cause__
            if _is_config_error(cause):
                where = f"s3://{self.config.bucket} at {self.config.endpoint_url or 'AWS'}"
                raise ValueError(f"--image-store {where}: {_describe(cause)}") from None
            logger.error("the image store does not answer yet (%s); carrying on and retrying", exc.message)
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_loop(), name="s3-reaper")
        logger.info("images in %r (endpoint %s)", self, self.config.endpoint_url or "AWS")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
            self._reaper = None
        # obstore's Rust threads may still wake this loop just after their last answer; one
        # that does so while the interpreter finalizes aborts the process (see __main__._leave):
        # let them do it now.
        await asyncio.sleep(CLOSE_SETTLE)

    async def _list_one(self) -> None:
        stream = self.obstore.list(self.store, chunk_size=1)  # (under the store's prefix)
        async for _ in stream:
            break

    # The ImageStore interface

    async def put(
        self, data: bytes, media_type: str, ttl: float, image_uuid: str | None = None
    ) -> StoredImage:
        image = StoredImage(image_uuid or new_uuid(), data, media_type, self.clock() + ttl)
        attributes = {"Content-Type": media_type, META_EXPIRES: f"{image.expires_at:.3f}"}
        put = self.obstore.put_async(self.store, image.image_uuid, data, attributes=attributes)
        # The index first: an entry for an object that a failed PUT never wrote is harmless
        # (deleting a missing key succeeds); an object the index does not know is not.
        await self.index.add(image.image_uuid, image.expires_at)
        await self._call("PUT", put)
        self.counts["puts"] += 1
        return image

    async def get(self, image_uuid: str) -> StoredImage | None:
        result = await self._get(image_uuid)
        if result is None:
            return None
        data = bytes(await self._call("GET", result.bytes_async()))
        self.counts["gets"] += 1
        return StoredImage(image_uuid, data, _media_type(result), _expiry(result))

    async def open(self, image_uuid: str) -> OpenedImage | None:
        result = await self._get(image_uuid)
        if result is None:
            return None
        self.counts["gets"] += 1
        length, media_type, expires_at = result.meta["size"], _media_type(result), _expiry(result)
        if length < READ_WHOLE_BELOW:
            data = bytes(await self._call("GET", result.bytes_async()))
            return OpenedImage(image_uuid, media_type, expires_at, len(data), data=data)
        chunks = self._chunks(result.stream(min_chunk_size=CHUNK))
        return OpenedImage(image_uuid, media_type, expires_at, length, chunks=chunks, release=chunks.aclose)

    async def presigned_url(self, image_uuid: str) -> str | None:
        if not is_uuid(image_uuid):
            return None
        expires_at = await self.index.expires_at(image_uuid)
        if expires_at is None:  # not in the index (a restarted serve): the object says
            expires_at = await self._head_expiry(image_uuid)
        if expires_at is None or expires_at <= self.clock():
            return None
        return await self._sign(image_uuid, expires_at)

    async def public_url(self, image: StoredImage) -> str | None:
        return await self._sign(image.image_uuid, image.expires_at) if self.presigns else None

    def stats(self) -> dict:
        return {"kind": "s3", "healthy": self.healthy, **self.counts}

    # Reading

    async def _get(self, image_uuid: str):
        """The object's GET response (its body unread), or None if unknown or expired."""
        if not is_uuid(image_uuid):
            return None
        known = self.index.cached(image_uuid)
        if known is not None and known <= self.clock():
            return None  # expired: refused without asking the store
        try:
            result = await self._call("GET", self.obstore.get_async(self.store, image_uuid))
        except FileNotFoundError:
            return None
        if _expiry(result) <= self.clock():
            return None  # the reaper deletes it (or the lifecycle rule, if no index knows it)
        return result

    async def _head_expiry(self, image_uuid: str) -> float | None:
        try:
            # head() returns no attributes: a GET of the first byte carries the metadata.
            options = {"range": (0, 1)}
            result = await self._call("GET", self.obstore.get_async(self.store, image_uuid, options=options))
        except FileNotFoundError:
            return None
        return _expiry(result)

    async def _chunks(self, stream) -> AsyncIterator[bytes]:
        """The body's pieces, each within the store's time-out."""
        iterator = stream.__aiter__()
        while True:
            try:
                chunk = await self._call("GET", iterator.__anext__())
            except StopAsyncIteration:
                return
            yield bytes(chunk)

    async def _sign(self, image_uuid: str, expires_at: float) -> str:
        seconds = min(MAX_PRESIGN, max(1, math.ceil(expires_at - self.clock())))
        return await self._call(
            "sign", self.obstore.sign_async(self.store, "GET", image_uuid, timedelta(seconds=seconds))
        )

    # Expired images

    async def _reap_loop(self) -> None:
        delay = self.reap_every
        while True:
            await asyncio.sleep(delay)
            try:
                while await self.reap() == REAP_BATCH:
                    pass
                delay = self.reap_every
            except Exception as exc:  # the store or the index is away: try again later
                logger.debug("expired images not deleted yet: %s", exc)
                delay = min(delay * 2, 30.0)

    async def reap(self) -> int:
        """Delete the images whose time is up (a batch); how many."""
        due = await self.index.take_due(self.clock(), REAP_BATCH)
        if not due:
            return 0
        try:
            await self._call("DELETE", self.obstore.delete_async(self.store, [name for name, _ in due]))
        except TaskError:
            await self.index.put_back(due)
            raise
        self.counts["deleted"] += len(due)
        return len(due)

    # Every call

    async def _call(self, what: str, call: Awaitable):
        """Await one store call within the time-out; failures become ``serviceUnavailable``
        (an unknown key stays FileNotFoundError, end of a stream StopAsyncIteration)."""
        try:
            async with asyncio.timeout(self.config.timeout):
                result = await call
        except (FileNotFoundError, StopAsyncIteration):
            self.healthy = True
            raise
        except TimeoutError as exc:
            self._failed(what, f"timed out after {self.config.timeout:g} s")
            raise store_unavailable(f"did not answer a {what} within {self.config.timeout:g} s") from exc
        except (OSError, self.obstore.exceptions.BaseError) as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(str(exc)) from exc
            self._failed(what, _describe(exc))
            reason = "refused the credentials" if _is_config_error(exc) else f"failed a {what}"
            raise store_unavailable(reason) from exc
        if not self.healthy:
            logger.warning("the image store answers again")
        self.healthy = True
        return result

    def _failed(self, what: str, detail: str) -> None:
        self.counts["errors"] += 1
        if self.healthy:
            logger.error("the image store failed a %s: %s", what, detail)
        self.healthy = False


def _s3_store(config: ImageStoreConfig):
    from obstore.store import S3Store

    endpoint = config.endpoint_url
    options = {
        "connect_timeout": f"{max(0.1, min(2.0, config.timeout)):g}s",
        "timeout": STREAM_TIMEOUT,
        "allow_http": bool(endpoint and endpoint.startswith("http://")),
    }
    retry = {
        "max_retries": RETRIES,
        "backoff": {
            "init_backoff": timedelta(milliseconds=100),
            "max_backoff": timedelta(seconds=2),
            "base": 2,
        },
        "retry_timeout": timedelta(seconds=config.timeout),
    }
    settings = {"region": config.region or _region(), **_file_credentials()}
    if endpoint:
        settings["endpoint"] = endpoint
    return S3Store(
        config.bucket,
        prefix=config.prefix or None,
        config=settings,
        client_options=options,
        retry_config=retry,
    )


_ENV_CREDENTIALS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def _file_credentials() -> dict[str, str]:
    """Static keys of ``AWS_PROFILE`` (or ``default``) in the shared credentials file
    (``AWS_SHARED_CREDENTIALS_FILE``, ``~/.aws/credentials``), when the environment
    names no credentials; otherwise nothing (obstore reads the environment and the
    container or instance role itself)."""
    if any(os.environ.get(name) for name in _ENV_CREDENTIALS):
        return {}
    profile = os.environ.get("AWS_PROFILE", "default")
    section = _ini_section(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), profile)
    if "aws_access_key_id" not in section or "aws_secret_access_key" not in section:
        return {}
    found = {
        "access_key_id": section["aws_access_key_id"],
        "secret_access_key": section["aws_secret_access_key"],
    }
    if section.get("aws_session_token"):
        found["session_token"] = section["aws_session_token"]
    return found


def _region() -> str:
    """``AWS_REGION``, ``AWS_DEFAULT_REGION``, the profile's region in the AWS config file
    (``AWS_CONFIG_FILE``, ``~/.aws/config``), or us-east-1."""
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if os.environ.get(name):
            return os.environ[name]
    profile = os.environ.get("AWS_PROFILE", "default")
    section = profile if profile == "default" else f"profile {profile}"
    return (
        _ini_section(os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"), section).get("region") or "us-east-1"
    )


def _ini_section(path: str, section: str) -> dict[str, str]:
    parser = configparser.RawConfigParser()
    try:
        parser.read(Path(path).expanduser())
    except (OSError, configparser.Error):
        return {}
    return dict(parser[section]) if parser.has_section(section) else {}


def _media_type(result) -> str:
    return result.attributes.get("Content-Type") or "application/octet-stream"


def _expiry(result) -> float:
    """The object's expiry from its metadata (0, expired, if it has none: not ours)."""
    try:
        return float(result.attributes.get(META_EXPIRES, 0))
    except ValueError:
        return 0.0


def _is_not_found(exc: BaseException) -> bool:
    import obstore.exceptions

    return isinstance(exc, (FileNotFoundError, obstore.exceptions.NotFoundError))


# S3 error codes that are faults of the configuration, not of the moment.
_CONFIG_ERRORS = {
    "NoSuchBucket": "the bucket does not exist",
    "AccessDenied": "access denied (the credentials or the bucket's policy)",
    "InvalidAccessKeyId": "the access key is not known to the store",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
}


def _is_config_error(exc: BaseException | None) -> bool:
    if exc is None:
        return False
    import obstore.exceptions

    if isinstance(exc, (obstore.exceptions.PermissionDeniedError, obstore.exceptions.UnauthenticatedError)):
        return True
    return any(f"<Code>{code}</Code>" in str(exc) for code in _CONFIG_ERRORS)


def _describe(exc: BaseException) -> str:
    """What went wrong, in one line: an S3 error code's meaning, or the error's first line
    (obstore's messages name the request, never the credentials)."""
    text = str(exc)
    for code, meaning in _CONFIG_ERRORS.items():
        if f"<Code>{code}</Code>" in text:
            return f"{meaning} ({code})"
    first = text.strip().splitlines()[0][:300] if text.strip() else ""
    return first or type(exc).__name__
