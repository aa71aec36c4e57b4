"""The plain-HTTP ``GET`` endpoints, answered on every port that speaks HTTP.

One table, no I/O of its own: :meth:`Routes.get` takes a path and returns an
:class:`HttpResponse` (or ``None`` for "not mine"). Each HTTP front end adapts it to
its server: websockets' ``process_request`` on the WebSocket port
(``server.py``), aiohttp on the REST port (``rest.py``), and any other HTTP server the
gateway runs. A new endpoint is one entry in :meth:`Routes.get`, and every port has it.

- ``GET /healthz``: the process is alive.
- ``GET /readyz``: the model (or the cluster) can take tasks; 503 otherwise.
- ``GET /images/{uuid}.{ext}``: a stored image until its TTL ends; 404 after.
- ``GET /stats``: JSON counters (engine and gateway) for dashboards and the playground;
  no API key needed (it holds no secrets).
- ``GET /metrics``: Prometheus metrics (:mod:`gateway.metrics`), unless they are off or
  on a port of their own (``--no-metrics``, ``--metrics-port``); no API key needed.
- ``GET /playground`` and ``GET /playground/{file}``: the web playground
  (:mod:`gateway.playground`), with a strict Content-Security-Policy. A plain ``GET /``
  (a browser, not a WebSocket upgrade, which the front end handles first) redirects there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

import orjson

from . import playground

if TYPE_CHECKING:
    from .delivery import Gateway
    from .metrics import Metrics

__all__ = ["HttpResponse", "Routes"]

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes
    content_type: str = TEXT
    cache: str = "no-store"
    headers: tuple[tuple[str, str], ...] = ()  # any others (Location, CSP, …)

    @property
    def reason(self) -> str:
        return HTTPStatus(self.status).phrase

    def header_list(self) -> list[tuple[str, str]]:
        return [
            ("Content-Type", self.content_type),
            ("Content-Length", str(len(self.body))),
            ("Cache-Control", self.cache),
            *self.headers,
        ]


def text(status: int, message: str) -> HttpResponse:
    return HttpResponse(status, (message + "\n").encode())


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
        stored = await store.get(image_uuid)
        if stored is None:
            return text(404, "image not found or expired")
        max_age = max(0, math.floor(stored.expires_at - store.clock()))
        return HttpResponse(200, stored.data, stored.media_type, cache=f"public, max-age={max_age}, immutable")

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
        return HttpResponse(200, orjson.dumps(body), JSON)
