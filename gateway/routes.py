"""The plain-HTTP ``GET`` endpoints, answered on every port that speaks HTTP.

One table, no I/O of its own: :meth:`Routes.get` takes a path and returns an
:class:`HttpResponse` (or ``None`` for "not mine"). Each HTTP front end adapts it to
its server: websockets' ``process_request`` on the WebSocket port
(``server.py``), aiohttp on the REST port (``rest.py``), and any other HTTP server the
gateway runs. A new endpoint is one entry in :meth:`Routes.get`, and every port has it.

- ``GET /healthz``: the process is alive.
- ``GET /readyz``: the model (or the cluster) can take tasks; 503 otherwise.
- ``GET /images/{uuid}.{ext}``: a stored image until its TTL ends; 404 after. From an
  object store, a large image is a streamed body (:class:`BodyStream`), and with
  ``--s3-presign`` the answer is a 302 to a presigned URL that expires with the image;
  503 when the store cannot be reached.
- ``GET /stats``: JSON counters (engine and gateway) for dashboards and the playground;
  no API key needed (it holds no secrets).
- ``GET /metrics``: Prometheus metrics (:mod:`gateway.metrics`), unless they are off or
  on a port of their own (``--no-metrics``, ``--metrics-port``); no API key needed.
- ``GET /playground`` and ``GET /playground/{file}``: the web playground
  (:mod:`gateway.playground`), with a strict Content-Security-Policy. A plain ``GET /``
  (a browser, not a WebSocket upgrade, which the front end handles first) redirects there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

import orjson

from . import playground
from .errors import TaskError

if TYPE_CHECKING:
    from .delivery import Gateway
    from .metrics import Metrics

__all__ = ["BodyStream", "BufferBudget", "HttpResponse", "Routes"]

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"


@dataclass(frozen=True, slots=True)
class BodyStream:
    """A body sent as it is read: exactly ``length`` bytes from ``chunks``. The front end
    that sends it calls ``aclose()`` once, whether or not it read to the end (a client
    that hangs up, a store that fails mid-way: then it drops the connection)."""

    length: int
    chunks: AsyncIterator[bytes]
    aclose: Callable[[], Awaitable[None]]

    async def read_all(self) -> bytes:
        """The whole body, for a front end that cannot stream (it then holds a copy)."""
        try:
            return b"".join([chunk async for chunk in self.chunks])
        finally:
            await self.aclose()


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes
    content_type: str = TEXT
    cache: str = "no-store"
    headers: tuple[tuple[str, str], ...] = ()  # any others (Location, CSP, …)
    stream: BodyStream | None = None  # a large body, sent as it is read (``body`` is then empty)

    @property
    def reason(self) -> str:
        return HTTPStatus(self.status).phrase

    @property
    def length(self) -> int:
        return self.stream.length if self.stream is not None else len(self.body)

    def header_list(self) -> list[tuple[str, str]]:
        return [
            ("Content-Type", self.content_type),
            ("Content-Length", str(self.length)),
            ("Cache-Control", self.cache),
            *self.headers,
        ]


class BufferBudget:
    """For a front end that cannot stream a body (websockets' ``process_request``): it
    reads a streamed body whole, holding at most ``limit`` bytes of such bodies at once;
    a request over the budget waits its turn (at most ``wait`` seconds, then 503). One
    body larger than the whole budget is read alone."""

    def __init__(self, limit: int, wait: float = 30.0) -> None:
        self.limit = limit
        self.wait = wait
        self.used = 0
        self._freed = asyncio.Condition()

    async def whole(self, answer: HttpResponse) -> HttpResponse:
        """``answer`` with its stream read into ``body`` (as it is if it has none)."""
        if answer.stream is None:
            return answer
        need = min(answer.stream.length, self.limit)
        try:
            async with asyncio.timeout(self.wait), self._freed:
                await self._freed.wait_for(lambda: self.used + need <= self.limit)
                self.used += need
        except TimeoutError:
            await answer.stream.aclose()
            return text(503, "too many large images being sent at once on this port; try again")
        try:
            body = await answer.stream.read_all()
        except TaskError as exc:
            return text(503, exc.message)
        finally:
            async with self._freed:
                self.used -= need
                self._freed.notify_all()
        return dataclasses.replace(answer, body=body, stream=None)


def text(status: int, message: str) -> HttpResponse:
    return HttpResponse(status, (message + "\n").encode())


def _no_image() -> HttpResponse:
    return text(404, "image not found or expired")


def redirect(location: str) -> HttpResponse:
    """A 302 to ``location``, relative so that it works behind a path prefix."""
    return HttpResponse(302, b"", headers=(("Location", location),))


def metrics_response(metrics: Metrics) -> HttpResponse:
    """``GET /metrics``: the Prometheus text format."""
    from .metrics import CONTENT_TYPE

    return HttpResponse(200, metrics.render(), CONTENT_TYPE)


def _static(file: playground.StaticFile) -> HttpResponse:
    return HttpResponse(200, file.body, file.content_type, cache="no-cache", headers=playground.SECURITY_HEADERS)


class Routes:
    def __init__(
        self,
        gateway: Gateway,
        *,
        open_connections: Callable[[], int] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """``open_connections``: the front end's count of open sockets, for ``/stats``;
        ``metrics``: what ``/metrics`` serves (None: no such endpoint here)."""
        self.gateway = gateway
        self.open_connections = open_connections
        self.metrics = metrics
        self.playground = {name: _static(file) for name, file in playground.load().items()}  # read once

    async def get(self, path: str) -> HttpResponse | None:
        """The answer to ``GET path`` (query string already removed), or None."""
        if path == "/healthz":
            return text(200, "ok")
        if path == "/readyz":
            return text(200, "ready") if self.gateway.ready else text(503, "not ready")
        if path.startswith("/images/"):
            return await self._image(path.removeprefix("/images/"))
        if path == "/stats":
            return self._stats()
        if path == "/metrics" and self.metrics is not None:
            return metrics_response(self.metrics)
        if path == "/":
            return redirect("playground")
        if path == "/playground":
            return self.playground["index.html"]
        if path == "/playground/":  # the page's relative URLs need it without the slash
            return redirect("../playground")
        if path.startswith("/playground/") and path != "/playground/index.html":
            return self.playground.get(path.removeprefix("/playground/"))
        return None

    async def _image(self, name: str) -> HttpResponse:
        image_uuid = name.rsplit(".", 1)[0]
        store = self.gateway.store
        try:
            if store.presigns:
                url = await store.presigned_url(image_uuid)
                return HttpResponse(302, b"", headers=(("Location", url),)) if url else _no_image()
            opened = await store.open(image_uuid)
        except TaskError as exc:  # the store cannot be reached (serviceUnavailable)
            return text(503, exc.message)
        if opened is None:
            return _no_image()
        max_age = max(0, math.floor(opened.expires_at - store.clock()))
        cache = f"public, max-age={max_age}, immutable"
        if opened.data is not None:
            return HttpResponse(200, opened.data, opened.media_type, cache=cache)
        assert opened.chunks is not None
        stream = BodyStream(opened.length, opened.chunks, opened.aclose)
        return HttpResponse(200, b"", opened.media_type, cache=cache, stream=stream)

    def _stats(self) -> HttpResponse:
        """Counters since start; rates come from the difference of two reads over
        ``monotonic_s`` (e.g. rows per UNet call = Δunet_rows / Δunet_calls)."""
        counts = self.gateway.counts()
        if self.open_connections is not None:
            counts["connections"] = self.open_connections()
        body = {
            "monotonic_s": round(time.monotonic(), 3),
            "ready": self.gateway.ready,
            "engine": self.gateway.engine.stats().as_dict(),
            "gateway": counts,
        }
        store = self.gateway.store.stats()
        if store:
            body["image_store"] = store
        return HttpResponse(200, orjson.dumps(body), JSON)
