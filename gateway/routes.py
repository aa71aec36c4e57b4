"""The plain-HTTP ``GET`` endpoints, answered on every port that speaks HTTP.

One table, no I/O of its own: :meth:`Routes.get` takes a path and returns an
:class:`HttpResponse` (or ``None`` for "not mine"). Each HTTP front end adapts it to
its server: websockets' ``process_request`` on the WebSocket port
(``server.py``), aiohttp on the REST port (``rest.py``), and any other HTTP server the
gateway runs. A new endpoint is one entry in :meth:`Routes.get`, and every port has it.

- ``GET /healthz``: the process is alive.
- ``GET /readyz``: the model (or the cluster) can take tasks; 503 otherwise.
- ``GET /images/{uuid}.{ext}``: a stored image until its TTL ends; 404 after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .delivery import Gateway

__all__ = ["HttpResponse", "Routes"]

TEXT = "text/plain; charset=utf-8"


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


class Routes:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def get(self, path: str) -> HttpResponse | None:
        """The answer to ``GET path`` (query string already removed), or None."""
        if path == "/healthz":
            return text(200, "ok")
        if path == "/readyz":
            return text(200, "ready") if self.gateway.ready else text(503, "not ready")
        if path.startswith("/images/"):
            return self._image(path.removeprefix("/images/"))
        return None

    def _image(self, name: str) -> HttpResponse:
        image_uuid = name.rsplit(".", 1)[0]
        stored = self.gateway.store.get(image_uuid)
        if stored is None:
            return text(404, "image not found or expired")
        max_age = max(0, math.floor(stored.expires_at - self.gateway.clock()))
        return HttpResponse(200, stored.data, stored.media_type, cache=f"public, max-age={max_age}, immutable")
