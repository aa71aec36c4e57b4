"""The two cluster roles, wired and run until a stop signal.

- :func:`run_gateway`: the same :class:`~gateway.server.GatewayServer` as ``serve``,
  with the Redis implementations of its engine client, state and image store, and a
  webhook consumer. It loads no model.
- :func:`run_worker`: one engine (the in-process one, as in ``serve``) fed by a
  :class:`~gateway.cluster.worker.Worker`; ``--http-port`` serves ``/healthz``,
  ``/readyz``, ``/stats`` and ``/metrics`` for an orchestrator and Prometheus.

A gateway's metrics include the queue's backlog, read in the background by a
:class:`~gateway.cluster.monitor.ClusterMonitor`.
"""

from __future__ import annotations

import asyncio
import logging

import orjson

from engine.client import InprocEngineClient

from ..config import ClusterConfig, GatewayConfig
from ..images import image_store
from ..metrics import Metrics, cluster_families, worker_families
from ..routes import HttpResponse, metrics_response, text
from ..server import GatewayServer, serve_http_only, serve_metrics
from .images import RedisImageStore
from .link import RedisLink
from .monitor import ClusterMonitor
from .queue import RedisEngineClient
from .state import RedisState
from .webhooks import WebhookQueue
from .worker import Worker

__all__ = ["run_gateway", "run_worker"]

logger = logging.getLogger(__name__)


def gateway_server(config: GatewayConfig, cluster: ClusterConfig, link: RedisLink) -> GatewayServer:
    """A gateway on the cluster's Redis (not started)."""
    state = RedisState(
        link, member_id=cluster.member_id, session_ttl=config.session_ttl, record_ttl=config.record_ttl
    )
    store = image_store(config.image_store, link=link)  # Redis, or S3 with its expiry index on Redis
    engine = RedisEngineClient(
        link,
        state,
        max_queued=cluster.max_queued,
        unavailable_after=cluster.claim_timeout,
        max_deliveries=cluster.max_deliveries,
        images_in_redis=isinstance(store, RedisImageStore),
    )
    return GatewayServer(config, engine, store=store, state=state)


async def close_all(*closers) -> None:
    """Await each closer in turn; one that fails is logged and the rest still run."""
    for close in closers:
        try:
            await close()
        except Exception:
            logger.exception("shutting down: %s failed", getattr(close, "__qualname__", close))


async def run_gateway(config: GatewayConfig, cluster: ClusterConfig, stop: asyncio.Event) -> None:
    link = RedisLink(cluster.redis_url, name=f"gateway:{cluster.member_id}")
    server = gateway_server(config, cluster, link)
    hooks = WebhookQueue(
        link, server.gateway.post_webhook, consumer=cluster.member_id, claim_timeout=cluster.claim_timeout
    )
    monitor = ClusterMonitor(link, every=min(5.0, cluster.claim_timeout))
    if server.metrics is not None:
        metrics = server.metrics
        metrics.add_source(lambda: cluster_families(monitor.current(), link.healthy))
    await link.start()
    await server.start()
    await hooks.start()
    if server.metrics is not None:
        await monitor.start()
    logger.info("gateway %s on Redis %s", cluster.member_id, link.url.split("@")[-1])
    try:
        await stop.wait()
        logger.info("shutting down: finishing in-flight tasks (grace %.0f s)", config.shutdown_grace)
    finally:
        await close_all(monitor.close, server.close, hooks.close, link.close)
        logger.info("gateway %s stopped", cluster.member_id)


async def run_worker(
    config: GatewayConfig, cluster: ClusterConfig, stop: asyncio.Event, *, http_port: int | None = None
) -> None:
    link = RedisLink(cluster.redis_url, name=f"worker:{cluster.member_id}")
    metrics = None
    if config.metrics:
        metrics = Metrics(role="worker", model=config.engine.model, max_rows=config.engine.max_batch_rows)
    worker = Worker(config, cluster, InprocEngineClient(config.engine), link, metrics=metrics)
    if metrics is not None:
        metrics.add_source(lambda: worker_families(worker))
    await link.start()
    await worker.start()
    http = metrics_http = None
    on_http_port = metrics if config.metrics_port is None else None
    if http_port is not None:

        async def get(path: str) -> HttpResponse | None:
            if path == "/healthz":
                return text(200, "ok")
            if path == "/readyz":
                return text(200, "ready") if worker.ready else text(503, "not ready")
            if path == "/stats":
                return HttpResponse(200, orjson.dumps(worker.stats()), "application/json")
            if path == "/metrics" and on_http_port is not None:
                return metrics_response(on_http_port)
            return None

        http = await serve_http_only(get, config.host, http_port)
        logger.info("worker %s: health on http://%s:%d", cluster.member_id, config.host, http_port)
    if metrics is not None and config.metrics_port is not None:
        metrics_http = await serve_metrics(metrics, config.host, config.metrics_port)
    try:
        await stop.wait()
        logger.info("worker %s stopping (grace %.0f s)", cluster.member_id, config.shutdown_grace)
    finally:

        async def close_http() -> None:
            for server in (http, metrics_http):
                if server is not None:
                    server.close()
                    await server.wait_closed()

        await close_all(lambda: worker.close(grace=config.shutdown_grace), close_http, link.close)
        logger.info("worker %s stopped", cluster.member_id)
