"""``GatewayServer``: wires the engine, the gateway core and websockets together.

WebSocket at ``/``, ``/v1`` and ``/v1/`` (query strings ignored); plain HTTP on the
same port through websockets' ``process_request``: the ``GET`` endpoints of
:mod:`gateway.routes` (images, health, readiness, stats, the playground). With ``http_port``
set, the REST transport (:mod:`gateway.rest`) on that port, with the same ``GET``
endpoints, the same gateway and the same failed-authentication limiter.

Shutdown is a procedure, like websockets' ``Server.close()``: stop accepting, let
in-flight tasks finish within a grace period, close sockets with 1001, stop the engine.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from engine.client import EngineClient, InprocEngineClient

from .config import GatewayConfig, is_loopback
from .connection import AuthLimiter, Connection
from .delivery import Gateway
from .http import Outbound
from .images import ImageStore, image_store
from .metrics import Metrics, gateway_families
from .rest import RestServer
from .routes import BufferBudget, HttpResponse, Routes, metrics_response, text
from .state import GatewayState

__all__ = ["GatewayServer"]

logger = logging.getLogger(__name__)

WEBSOCKET_PATHS = ("/", "/v1", "/v1/")
# websockets' plain-HTTP answers cannot stream: a streamed image (from S3) is read whole,
# within this many bytes at once on this port (see routes.BufferBudget).
WHOLE_BODY_BUDGET = 64 * 2**20


class GatewayServer:
    """``async with GatewayServer(config) as server: ...`` serves until the block ends."""

    def __init__(
        self,
        config: GatewayConfig,
        engine: EngineClient | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        outbound: Outbound | None = None,
        store: ImageStore | None = None,
        state: GatewayState | None = None,
    ) -> None:
        if not config.api_keys and not is_loopback(config.host):
            raise ValueError(
                f"refusing to serve on {config.host} without an API key: pass --api-key (or set "
                "LATENT_UPSCALER_API_KEYS); only a loopback host may run without one"
            )
        self.config = config
        if store is None and config.image_store.kind != "memory":  # S3 (serve has no Redis)
            store = image_store(config.image_store)
        engine = engine or InprocEngineClient(config.engine)
        self.metrics = _metrics(config, engine)
        self.gateway = Gateway(
            config,
            engine,
            clock=clock,
            outbound=outbound,
            store=store,
            state=state,
            metrics=self.metrics,
        )
        self.limiter = AuthLimiter(config.auth_failures_per_minute, clock)
        self.whole_bodies = BufferBudget(WHOLE_BODY_BUDGET)
        self.connections: set[Connection] = set()
        if self.metrics is not None:
            self.metrics.add_source(lambda: gateway_families(self.gateway, self._open_connections()))
        on_main_port = self.metrics if config.metrics_port is None else None
        self.routes = Routes(self.gateway, open_connections=lambda: len(self.connections), metrics=on_main_port)
        self._server: Server | None = None
        self._metrics_server: Server | None = None
        self.rest: RestServer | None = None

    def _open_connections(self) -> dict[str, int]:
        """Open connections by transport, for the metrics."""
        counts = {"websocket": len(self.connections)}
        if self.rest is not None:
            counts["rest"] = self.rest.open_connections()
        return counts

    async def __aenter__(self) -> GatewayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"ws://{self.config.host}:{self.port}/v1"

    @property
    def http_url(self) -> str:
        """The REST endpoint (``http_port`` must be set)."""
        assert self.rest is not None, "no REST port: set GatewayConfig.http_port"
        return f"http://{self.config.host}:{self.config.http_port}/v1"

    async def start(self) -> None:
        if not self.config.api_keys:
            logger.warning("no API key configured: accepting any key (loopback only)")
        await self.gateway.start()
        # The loaded model is millions of long-lived objects: keep them out of the cyclic
        # collector's scans, whose full passes would otherwise show up as latency spikes.
        gc.collect()
        gc.freeze()
        # Per-task garbage is acyclic and freed by reference counting: young collections can
        # be rarer than the default, but not so rare that one pass is long (at 50,000 a pass
        # took ~10 ms at 1,000 tasks/s; at 5,000, under 1 ms).
        gc.set_threshold(5_000, 50, 1000)
        # websockets logs every frame at DEBUG, API keys and images included: never below INFO.
        ws_logger = logging.getLogger("gateway.websockets")
        ws_logger.setLevel(max(logging.INFO, ws_logger.getEffectiveLevel()))
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            max_size=self.config.max_frame_bytes,
            compression="deflate" if self.config.permessage_deflate else None,
            server_header="latent-upscale-gateway",
            logger=ws_logger,
        )
        if self.config.port == 0:  # an ephemeral port: URLs must name the real one
            self.config.port = self.port
        logger.info("serving on ws://%s:%d/v1", self.config.host, self.port)
        if self.config.http_port is not None:
            self.rest = RestServer(self.gateway, self.limiter, self.routes)
            await self.rest.start(self.config.host, self.config.http_port)
            self.config.http_port = self.rest.port  # (the real one, if it was 0)
            logger.info("serving REST on %s", self.http_url)
        if self.metrics is not None and self.config.metrics_port is not None:
            self._metrics_server = await serve_metrics(self.metrics, self.config.host, self.config.metrics_port)

    @property
    def metrics_port(self) -> int | None:
        """The port ``/metrics`` is served on, when it has one of its own."""
        server = self._metrics_server
        return None if server is None else server.sockets[0].getsockname()[1]

    async def close(self, grace: float | None = None) -> None:
        """Stop accepting, finish in-flight tasks within ``grace`` seconds, then close."""
        if self._server is None:
            return
        grace = self.config.shutdown_grace if grace is None else grace
        self._server.close(close_connections=False)
        if self.rest is not None:
            await self.rest.stop_accepting()
        deadline = time.monotonic() + grace
        while self.gateway.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            # Let queued results reach their clients before the close frame.
            connection._close_after_flush(1001, "server shutting down")
        try:
            await asyncio.wait_for(self._server.wait_closed(), timeout=10)
        except TimeoutError:  # a peer that never answers the close handshake: go on without it
            logger.warning("%d sockets did not close within 10 s; shutting down anyway", len(self.connections))
        await self.gateway.close()  # REST requests still waiting get their tasks' taskAborted
        if self.rest is not None:
            await self.rest.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
            await self._metrics_server.wait_closed()
            self._metrics_server = None
        self._server = None

    async def _handle(self, ws: ServerConnection) -> None:
        connection = Connection(ws, self.gateway, self.limiter)
        self.connections.add(connection)
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)

    # Plain HTTP on the same port

    async def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        is_upgrade = "websocket" in request.headers.get("Upgrade", "").lower()
        if path in WEBSOCKET_PATHS and is_upgrade:
            return None
        answer = await self.routes.get(path)
        if answer is None and path in WEBSOCKET_PATHS:
            answer = text(426, "this endpoint speaks WebSocket")
        return _response(await self.whole_bodies.whole(answer or text(404, "not found")))


def _response(answer: HttpResponse) -> Response:
    # websockets closes the connection after a plain-HTTP answer: say so, or a client
    # that keeps connections alive sends its next request into a closing socket.
    headers = Headers([*answer.header_list(), ("Connection", "close")])
    return Response(answer.status, answer.reason, headers, answer.body)


def _metrics(config: GatewayConfig, engine: EngineClient) -> Metrics | None:
    if not config.metrics:
        return None
    role = "gateway" if engine.remote else "serve"
    return Metrics(
        role=role, model=config.engine.model, engine=not engine.remote, max_rows=config.engine.max_batch_rows
    )


async def serve_metrics(metrics: Metrics, host: str, port: int) -> Server:
    """``GET /metrics`` alone on a port of its own (``--metrics-port``)."""

    async def get(path: str) -> HttpResponse | None:
        return metrics_response(metrics) if path == "/metrics" else None

    server = await serve_http_only(get, host, port)
    logger.info("metrics on http://%s:%d/metrics", host, server.sockets[0].getsockname()[1])
    return server


async def serve_http_only(
    get: Callable[[str], Awaitable[HttpResponse | None]], host: str, port: int
) -> Server:
    """A plain-HTTP ``GET`` server (no WebSocket), on websockets' HTTP/1.1 handling:
    what a cluster worker's ``--http-port`` answers (``/healthz``, ``/readyz``, …)."""

    async def answer(ws: ServerConnection, request: Request) -> Response:
        found = await get(request.path.split("?", 1)[0])
        return _response(found or text(404, "not found"))

    async def never(ws: ServerConnection) -> None:  # every request is answered above
        return None

    quiet = logging.getLogger("gateway.http")  # not a line per health probe
    quiet.setLevel(max(logging.WARNING, quiet.getEffectiveLevel()))
    return await serve(
        never, host, port, process_request=answer, server_header="latent-upscale-gateway", logger=quiet
    )
