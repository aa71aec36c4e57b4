"""Prometheus metrics: every metric declared once, here, and served at ``GET /metrics``.

One :class:`Metrics` per process (``serve``, a cluster gateway or a worker), with a
registry of its own. Like vLLM's v1 metrics: the metrics are declared in one class and
bound to their few, fixed label values up front, so every series starts at 0 (a
``rate()`` sees the first increment); names carry the ``latent_upscaler_`` prefix and a
base unit (``…_seconds``, ``…_bytes``, ``…_total``); buckets are chosen per metric.
No label ever holds a per-task or per-session value.

Where the numbers come from:

- **events**, counted as they happen: a task's terminal item (:meth:`Metrics.task_ended`,
  called by ``Gateway.finish`` and a worker's ``_finish``), an outbound request
  (:meth:`Metrics.outbound_done`, from ``Outbound``), and the engine's plain events
  (:meth:`Metrics.observe_engine`, an ``engine.stats`` observer on the engine's threads:
  one ``observe`` per UNet call, VAE call and finished request, nothing else);
- **state**, read at scrape time from whatever holds it (:meth:`Metrics.add_source`):
  open connections, sessions, the image store, the engine's requests by stage, and in
  a cluster the queue's backlog (``gateway.cluster.monitor``, refreshed in the
  background: a scrape never waits for Redis).

With ``--no-metrics`` a process has no :class:`Metrics` at all, and the call sites skip
the counting (``if metrics is not None``): the cost is then nothing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from engine.api import ErrorCode
from engine.stats import RequestDone, UnetCall, VaeCall

if TYPE_CHECKING:
    from engine.client import EngineClient

    from .cluster.monitor import ClusterSnapshot
    from .cluster.worker import Worker
    from .delivery import Gateway

__all__ = [
    "CONTENT_TYPE",
    "PREFIX",
    "Metrics",
    "cluster_families",
    "engine_families",
    "gateway_families",
    "gauge",
    "worker_families",
]

logger = logging.getLogger(__name__)

# The `_created` series double every counter's output and no dashboard here uses them.
prometheus_client.disable_created_metrics()

PREFIX = "latent_upscaler_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format every Prometheus reads

# One UNet or VAE call: about a millisecond on a big GPU with small latents, seconds on a CPU.
CALL_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# Waiting for the first UNet step (engine queue) or for a worker (cluster queue).
WAIT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
# A task end to end: under a millisecond on the null engine, minutes for a big CPU job.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip

UPSCALE = "imageUpscale"
TASK_TYPES = {"imageUpscale": UPSCALE, "upscale": UPSCALE, "imageUpload": "imageUpload"}
DELIVERIES = ("sync", "async")
OUTBOUND_KINDS = ("input", "webhook", "upload")
VAE_OPS = ("encode", "decode")
_CODE = re.compile(r"[a-z][A-Za-z]{0,47}")


def row_buckets(max_rows: int) -> tuple[int, ...]:
    """Rows per UNet call: every small count, then coarser steps, up to ``max_rows``."""
    steps = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    return (*(n for n in steps if n < max_rows), max_rows)


def engine_codes() -> list[str]:
    """The codes a task can end with when its engine request fails (bound up front)."""
    wire = {ErrorCode.INVALID_IMAGE: "invalidInputImage"}
    return [wire.get(code, str(code)) for code in ErrorCode]


def task_type_label(task_type: str | None) -> str:
    return TASK_TYPES.get(task_type or "", "other")


def outcome_label(code: str | None) -> str:
    """``success`` for None, else the error code (codes are the server's own, a bounded
    set; anything that does not look like one is ``other``)."""
    if code is None:
        return "success"
    return code if _CODE.fullmatch(code) else "other"


Source = Callable[[], Iterable[Metric]]


class _Sources(Collector):
    """Metrics read at scrape time (gauges of current state) from registered sources.
    A failing source is skipped: a scrape always answers."""

    def __init__(self) -> None:
        self.sources: list[Source] = []

    def collect(self) -> Iterable[Metric]:
        for source in self.sources:
            try:
                families = list(source())
            except Exception:  # a bug in one source must not take /metrics down
                logger.exception("a metrics source failed")
                continue
            yield from families


class Metrics:
    """A process's metrics. ``role``: ``serve``, ``gateway`` or ``worker``; ``engine``:
    whether this process runs an engine (then its histograms are declared), with
    ``max_rows`` rows per UNet call at most."""

    def __init__(self, *, role: str, model: str = "", engine: bool = True, max_rows: int = 16) -> None:
        self.role = role
        self.registry = registry = CollectorRegistry(auto_describe=True)
        prometheus_client.ProcessCollector(registry=registry)
        prometheus_client.GCCollector(registry=registry)
        self._sources = _Sources()
        registry.register(self._sources)
        info = {"role": role, "model": model[:200]}
        self.add_source(
            lambda: [gauge("info", "This process: its role and the model it serves (value 1).", 1, info)]
        )

        self.tasks = Counter(
            PREFIX + "tasks",
            "Tasks that got their terminal item, by task type and outcome (success or the error code). "
            "In a cluster each process counts the tasks it ended: workers those they ran, gateways "
            "those refused or failed before reaching a worker.",
            ["task_type", "outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            PREFIX + "task_latency_seconds",
            "Upscale tasks: accepted (or, on a worker, queued) until their terminal item was sent, "
            "by delivery method.",
            ["delivery"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.outbound = Counter(
            PREFIX + "outbound_requests",
            "Outbound HTTP requests (input URLs, webhooks, uploads), by outcome after retries: "
            "success, or blocked, invalid, timeout, too_large, status, network.",
            ["kind", "outcome"],
            registry=registry,
        )
        # Bound children by (task type, outcome): labels() takes a lock and builds a key.
        self._tasks: dict[tuple[str, str], Counter] = {}
        for code in ["success", *engine_codes()]:
            self._task_counter(UPSCALE, code)
        self._task_counter("imageUpload", "success")
        self._latency = {delivery: self.latency.labels(delivery) for delivery in DELIVERIES}
        for kind in OUTBOUND_KINDS:
            self.outbound.labels(kind, "success")
        self.has_engine = engine
        if engine:
            self._declare_engine(registry, max_rows)
        if role == "worker":
            self.cluster_wait = Histogram(
                PREFIX + "cluster_queue_wait_seconds",
                "Cluster tasks: queued on Redis until a worker began them (the stream entry's "
                "time on Redis's clock against the worker's).",
                buckets=WAIT_BUCKETS,
                registry=registry,
            )

    def _declare_engine(self, registry: CollectorRegistry, max_rows: int) -> None:
        self.queue_wait = Histogram(
            PREFIX + "queue_wait_seconds",
            "Engine requests: admitted until their first UNet step.",
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.unet_rows = Histogram(
            PREFIX + "unet_batch_rows",
            "Rows per UNet call (a CFG request takes two): the batch fill. _sum/_count is the mean.",
            buckets=row_buckets(max_rows),
            registry=registry,
        )
        self.unet_seconds = Histogram(
            PREFIX + "unet_step_seconds",
            "One UNet call (one denoising step of every request in the batch).",
            buckets=CALL_BUCKETS,
            registry=registry,
        )
        vae = Histogram(
            PREFIX + "vae_seconds",
            "One batched VAE call, by operation (encode the inputs, decode the outputs).",
            ["op"],
            buckets=CALL_BUCKETS,
            registry=registry,
        )
        self._vae = {op: vae.labels(op) for op in VAE_OPS}
        self.vae_items = Counter(
            PREFIX + "vae_items", "Images through the VAE, by operation.", ["op"], registry=registry
        )
        self._vae_items = {op: self.vae_items.labels(op) for op in VAE_OPS}

    # Events

    def task_ended(
        self, task_type: str | None, code: str | None, *, deliver_async: bool, seconds: float | None
    ) -> None:
        """A task's terminal item: ``code`` None for success; ``seconds`` since it was
        accepted (None: it was refused at admission, and is counted but not timed)."""
        self._task_counter(task_type_label(task_type), outcome_label(code)).inc()
        if seconds is not None:
            self._latency["async" if deliver_async else "sync"].observe(seconds)

    def _task_counter(self, task_type: str, outcome: str) -> Counter:
        child = self._tasks.get((task_type, outcome))
        if child is None:
            child = self._tasks[(task_type, outcome)] = self.tasks.labels(task_type, outcome)
        return child

    def outbound_done(self, kind: str, outcome: str) -> None:
        self.outbound.labels(kind if kind in OUTBOUND_KINDS else "other", outcome_label(outcome)).inc()

    def observe_engine(self, event: UnetCall | VaeCall | RequestDone) -> None:
        """An engine observer (``engine.stats``): runs on the engine's threads, one
        ``observe`` per event; prometheus_client's metrics are thread-safe."""
        if isinstance(event, UnetCall):
            self.unet_rows.observe(event.rows)
            self.unet_seconds.observe(event.seconds)
        elif isinstance(event, VaeCall):
            if event.op in self._vae:
                self._vae[event.op].observe(event.seconds)
                self._vae_items[event.op].inc(event.items)
        elif isinstance(event, RequestDone) and event.first_step is not None:
            self.queue_wait.observe(event.first_step)

    def watch_engine(self, engine: EngineClient) -> None:
        """Observe ``engine``'s events (if it has any) and read its request gauges."""
        observers = getattr(engine, "observers", None)
        if self.has_engine and observers is not None:
            observers.add(self.observe_engine)
        if self.has_engine:
            self.add_source(lambda: engine_families(engine))

    # Scrape

    def add_source(self, source: Source) -> None:
        """Read ``source()`` (metric families, e.g. from :func:`gauge`) at every scrape."""
        self._sources.sources.append(source)

    def render(self) -> bytes:
        """The text exposition format (``Content-Type``: :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


def gauge(
    name: str,
    doc: str,
    value: float | None = None,
    labels: dict[str, str] | None = None,
    *,
    by: dict[str, dict[str, float]] | None = None,
) -> Metric:
    """A gauge family for scrape time: one ``value`` (with fixed ``labels``), or, with
    ``by={label: {label value: value}}``, one series per label value."""
    if by:
        ((label, values),) = by.items()
        family = GaugeMetricFamily(PREFIX + name, doc, labels=[label])
        for key, number in values.items():
            family.add_metric([key], number)
        return family
    if labels:
        family = GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))
        family.add_metric(list(labels.values()), value or 0)
        return family
    return GaugeMetricFamily(PREFIX + name, doc, value=value or 0)


PER_SHAPE_LIMIT = 50  # shapes exported one by one, those with the most queued first


def cluster_families(snapshot: ClusterSnapshot | None, redis_up: bool) -> list[Metric]:
    """A cluster gateway's view of the queue (``gateway.cluster.monitor``); without a
    fresh snapshot only ``cluster_redis_up`` is exported (no stale numbers)."""
    families = [
        gauge("cluster_redis_up", "1 while Redis answers this process's health probes.", int(redis_up))
    ]
    if snapshot is None:
        return families
    busy = sorted(
        (s for s in snapshot.backlog if snapshot.backlog[s] or snapshot.held[s]), key=snapshot.backlog.get
    )
    shown = busy[::-1][:PER_SHAPE_LIMIT]
    families += [
        gauge(
            "cluster_backlog_tasks",
            "Tasks queued on Redis that no worker has taken yet (all shapes): what an autoscaler "
            "scales workers on. The same on every gateway: aggregate with max.",
            sum(snapshot.backlog.values()),
        ),
        gauge(
            "cluster_shape_backlog_tasks",
            f"cluster_backlog_tasks by latent shape (HxW; shapes with work only, at most {PER_SHAPE_LIMIT}).",
            by={"shape": {s: snapshot.backlog[s] for s in shown}},
        ),
        gauge(
            "cluster_held_tasks",
            "Tasks workers have taken and not finished (pending stream entries).",
            sum(snapshot.held.values()),
        ),
        gauge("cluster_workers", "Live workers (liveness key not expired).", snapshot.workers),
    ]
    if snapshot.redis_memory_bytes is not None:
        families.append(
            gauge("cluster_redis_memory_bytes", "Memory Redis uses.", snapshot.redis_memory_bytes)
        )
    return families


def worker_families(worker: Worker) -> list[Metric]:
    """A cluster worker's own state and counters."""
    used = worker.held_rows()
    return [
        gauge(
            "cluster_redis_up",
            "1 while Redis answers this process's health probes.",
            int(worker.link.healthy),
        ),
        gauge("worker_held_tasks", "Tasks this worker has taken and not finished.", len(worker.held)),
        gauge("worker_held_rows", "UNet rows of the tasks this worker is denoising.", used),
        CounterMetricFamily(
            PREFIX + "cluster_redeliveries",
            "Tasks this worker took over from a worker that died or stalled.",
            value=worker.redelivered,
        ),
        CounterMetricFamily(
            PREFIX + "cluster_dead_lettered",
            "Tasks this worker ended with taskRetriesExhausted (past --max-deliveries).",
            value=worker.dead_lettered,
        ),
    ]


def engine_families(engine: EngineClient) -> list[Metric]:
    """The engine's requests now, by stage (``EngineClient.stats()``: a snapshot)."""
    stats = engine.stats()
    by_state = {"waiting": stats.waiting, "denoising": stats.denoising, "decoding": stats.decoding}
    return [gauge("engine_requests", "Requests the engine holds now, by stage.", by={"state": by_state})]


def gateway_families(gateway: Gateway, connections: dict[str, int]) -> list[Metric]:
    """What a gateway holds now: ``connections`` open by transport (``websocket``,
    ``rest``), sessions, tasks and stored image bytes."""
    counts = gateway.counts()
    sessions = {"attached": counts.get("sessions_attached", 0)}
    if "sessions_detached" in counts:  # known in `serve`; in a cluster they live in Redis
        sessions["detached"] = counts["sessions_detached"]
    families = [
        gauge(
            "connections",
            "Open connections, by transport: WebSocket, or REST (HTTP keep-alive, idle ones included).",
            by={"transport": connections},
        ),
        gauge(
            "sessions",
            "Sessions: attached to a socket here, or detached and kept for a resume (serve only).",
            by={"state": sessions},
        ),
        gauge(
            "tasks_in_flight",
            "Upscale tasks accepted here and not yet answered.",
            counts.get("tasks_in_flight", 0),
        ),
    ]
    store_bytes = getattr(gateway.store, "bytes", None)
    if store_bytes is not None:  # the in-memory store (in a cluster the images are in Redis)
        families.append(gauge("image_store_bytes", "Bytes of images held by the image store.", store_bytes))
    return families
