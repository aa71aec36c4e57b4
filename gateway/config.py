"""Gateway settings: one dataclass grouped like ``serve()``'s arguments, every default named."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from engine.config import EngineConfig

__all__ = ["ClusterConfig", "GatewayConfig", "ImageStoreConfig", "is_loopback"]

RUNWARE_MODEL_ID = "runware:502@1"


@dataclass(frozen=True)
class ImageStoreConfig:
    """Where images live (``--image-store``): ``memory`` (``serve``'s default), ``redis``
    (a cluster's default) or ``s3`` (``s3://BUCKET/PREFIX``; see ``gateway.objectstore``).
    S3 credentials never come from here: the standard AWS variables and files hold them."""

    kind: str = "memory"
    bucket: str = ""
    prefix: str = ""  # key prefix inside the bucket, without a trailing slash
    endpoint_url: str | None = None  # None: AWS itself
    region: str | None = None  # None: AWS_REGION / AWS_DEFAULT_REGION / the AWS config file / us-east-1
    presign: bool = False  # GET /images/… and imageURL: presigned URLs of the store
    timeout: float = 10.0  # seconds one store operation may take, its retries included

    @classmethod
    def parse(cls, spec: str, **options) -> ImageStoreConfig:
        """``memory``, ``redis`` or ``s3://BUCKET[/PREFIX]``, with the S3 ``options``."""
        if spec in ("memory", "redis"):
            return cls(spec, **options)
        if not spec.startswith("s3://"):
            raise ValueError(f"--image-store must be memory, redis or s3://BUCKET/PREFIX, not {spec!r}")
        bucket, _, prefix = spec.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"--image-store {spec!r} names no bucket: use s3://BUCKET/PREFIX")
        return cls("s3", bucket, prefix.strip("/"), **options)


@dataclass
class GatewayConfig:
    # Network
    host: str = "127.0.0.1"
    port: int = 8787
    public_url: str | None = None  # base of imageURL; default http://HOST:PORT
    permessage_deflate: bool = False
    # REST (POST /v1) and the GET endpoints on a port of their own; None: no REST port,
    # 0: any free port (tests). The command line's default is 8788.
    http_port: int | None = None
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call REST ("*": any)

    # Authentication
    api_keys: tuple[str, ...] = ()  # none on a loopback host: any key is accepted (with a warning)
    max_auth_failures: int = 3  # per socket, then it is closed
    auth_failures_per_minute: int = 20  # per peer address, then refused at once

    # Models
    model_aliases: tuple[str, ...] = ()  # accepted `model` values besides runware:502@1 and the loaded id

    # Limits
    max_frame_bytes: int = 32 * 2**20
    max_tasks_per_frame: int = 256
    max_in_flight_per_connection: int = 64
    max_in_flight_per_key: int = 256
    max_steps: int = 100
    max_ttl: float = 7 * 86400.0  # the largest `ttl` a task may ask for (images stay that long)
    max_input_bytes: int = 32 * 2**20  # a fetched URL input
    send_queue_frames: int = 256  # per connection; a reader slower than this is dropped

    # Timeouts
    idle_timeout: float = 120.0
    rest_timeout: float = 300.0  # a sync REST request answers unfinished tasks with a time-out error
    send_timeout: float = 30.0  # a frame not written within this drops the connection
    url_timeout: float = 10.0
    shutdown_grace: float = 30.0

    # Retention
    session_ttl: float = 120.0
    output_ttl: float = 3600.0
    record_ttl: float = 3600.0
    store_bytes: int = 2 * 2**30
    image_store: ImageStoreConfig = field(default_factory=ImageStoreConfig)

    # Observability (gateway/metrics.py)
    metrics: bool = True  # GET /metrics; False: no metrics are kept at all
    metrics_port: int | None = None  # serve /metrics on this port only (not on `port`)

    # Outbound
    allow_private_networks: bool = False
    price_per_gpu_hour: float = 2.0  # USD; the basis of `cost`

    engine: EngineConfig = field(default_factory=EngineConfig)

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def accepted_models(self) -> set[str]:
        return {RUNWARE_MODEL_ID, self.engine.model, *self.model_aliases}


@dataclass
class ClusterConfig:
    """A cluster role's settings (``latent-upscaler gateway`` / ``worker``)."""

    redis_url: str
    member_id: str  # this gateway's or worker's name: its consumer name and channel
    claim_timeout: float = 15.0  # seconds of silence before a worker's tasks go to another
    max_deliveries: int = 3  # deliveries of one task before it ends with an error
    max_queued: int = 10_000  # unfinished queued tasks, cluster-wide, before rateLimitExceeded


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
