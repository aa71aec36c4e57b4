"""``latent-upscaler serve | gateway | worker | upscale`` (also ``python -m gateway …``): the command line.

Every flag has an environment variable, ``LATENT_UPSCALER_<FLAG>`` (upper case,
dashes as underscores); a flag on the command line wins over the variable.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from engine.config import DEFAULT_MODEL, VAE_OVERLAP, EngineConfig

from .cli_upscale import add_parser as add_upscale_parser
from .config import ClusterConfig, GatewayConfig, ImageStoreConfig

ENV_PREFIX = "LATENT_UPSCALER_"
BATCHING = ("continuous", "static")
GROUP_POLICIES = ("deadline", "round-robin")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _flag(group, flag: str, *, type=str, default=None, help: str, env: str | None = None, **kw) -> None:
    env = env or _env_name(flag)
    raw = os.environ.get(env)
    if raw is not None and kw.get("action") == "append":
        default = [item.strip() for item in raw.split(",") if item.strip()]
    elif raw is not None:
        default = raw.lower() in ("1", "true", "yes", "on") if type is bool else type(raw)
    if type is bool:
        group.add_argument(
            flag,
            action=argparse.BooleanOptionalAction,
            default=bool(default),
            help=f"{help} (env {env})",
            **kw,
        )
    else:
        shown = "" if default is None else f"; default {default}"
        group.add_argument(flag, type=type, default=default, help=f"{help} (env {env}{shown})", **kw)


def _port_or_off(value: str) -> int | None:
    """A port number, or "off" (None)."""
    return None if value.strip().lower() in ("off", "none", "") else int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latent-upscaler",
        description="A Runware-compatible WebSocket gateway serving Stability's 2x latent upscaler.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "serve",
        help="serve the WebSocket and REST APIs: one process, the engine inside",
        description="Serve the Runware-compatible WebSocket API (ws://HOST:PORT/v1) and its HTTP endpoints "
        "(/images/…, /healthz, /readyz) on one port, and REST (POST http://HOST:HTTP_PORT/v1) with the "
        "same endpoints on another, with the engine in this process. Each flag has an environment variable.",
    )
    for add in (add_model_flags, _network_flags, _auth_flags, add_batching_flags, _limit_flags, _time_flags):
        add(s)
    _model_alias_flag(s.add_argument_group("model names"))
    _image_store_flags(s, default="memory")
    _outbound_flags(s)
    _observability_flags(s, "on the --port and the REST --http-port")
    _event_loop_flag(s)
    g = sub.add_parser(
        "gateway",
        help="cluster: a front end (sockets, HTTP) on Redis; loads no model",
        description="A cluster gateway: the same WebSocket API and HTTP endpoints as `serve`, with tasks "
        "queued on Redis for `latent-upscaler worker` processes and sessions that any gateway can resume. "
        "Loads no model. Each flag has an environment variable.",
    )
    _cluster_flags(g)
    for add in (_network_flags, _auth_flags, _limit_flags, _time_flags):
        add(g)
    group = g.add_argument_group("model names")
    _flag(
        group,
        "--model",
        default=DEFAULT_MODEL,
        help="the model the workers serve (accepted as a task's `model`, with runware:502@1)",
    )
    _model_alias_flag(group)
    _image_store_flags(g, default="redis")
    _outbound_flags(g)
    _observability_flags(g, "on the --port and the REST --http-port")
    _event_loop_flag(g)
    w = sub.add_parser(
        "worker",
        help="cluster: one engine pulling work from Redis",
        description="A cluster worker: one engine with every model and batching flag of `serve`, pulling "
        "work from Redis by its free capacity. Each flag has an environment variable.",
    )
    _cluster_flags(w)
    group = w.add_argument_group("worker")
    _flag(group, "--worker-id", help="this worker's name in the cluster; default host name + pid")
    _flag(
        group,
        "--http-port",
        type=_port_or_off,
        help="serve /healthz, /readyz and /stats (JSON) on this port, for an orchestrator; default none",
    )
    _flag(group, "--host", default="127.0.0.1", help="address the --http-port listens on")
    for add in (add_model_flags, add_batching_flags):
        add(w)
    _model_alias_flag(w.add_argument_group("model names"))
    group = w.add_argument_group("limits")
    _flag(group, "--max-steps", type=int, default=100, help="largest settings.steps")
    _flag(group, "--max-input-pixels", type=int, default=2048 * 2048, help="largest input image, in pixels")
    group = w.add_argument_group("timeouts and retention")
    _flag(group, "--output-ttl", type=float, default=3600.0, help="default lifetime of stored images, seconds")
    _flag(group, "--record-ttl", type=float, default=3600.0, help="seconds getResponse remembers a finished task")
    _flag(group, "--session-ttl", type=float, default=120.0, help="seconds undelivered results wait for a resume")
    _flag(group, "--shutdown-grace", type=float, default=30.0, help="seconds held tasks get on SIGTERM")
    _image_store_flags(w, default="redis")
    _outbound_flags(w)
    _observability_flags(w, "on the --http-port")
    _event_loop_flag(w)
    add_upscale_parser(sub, _flag, add_model_flags, add_batching_flags)
    return parser


def add_model_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The engine's model flags (``serve``, ``worker``, and ``upscale`` without ``--url``); returns their group."""
    g = parser.add_argument_group("model")
    _flag(
        g,
        "--model",
        default=DEFAULT_MODEL,
        help="hub id, local folder, 'tiny' (offline test model), or sim:FIXED_MS,PER_ROW_MS (a SIMULATED "
        "model for benchmarks: UNet calls sleep, outputs are resized inputs)",
    )
    _flag(g, "--revision", help="hub revision (the default model is pinned to one with safetensors)")
    _flag(g, "--device", help="torch device, e.g. cuda, cuda:1, cpu; default CUDA when present")
    _flag(g, "--dtype", help="fp32, fp16 or bf16; default fp16 on CUDA, fp32 on CPU")
    return g


def _model_alias_flag(group) -> None:
    _flag(
        group,
        "--model-alias",
        help="extra accepted `model` value (repeatable; env: comma-separated)",
        action="append",
    )


def _network_flags(parser) -> None:
    g = parser.add_argument_group("network")
    _flag(g, "--host", default="127.0.0.1", help="address to listen on")
    _flag(g, "--port", type=int, default=8787, help="port for WebSocket and HTTP")
    _flag(g, "--public-url", help="base URL of imageURL links, e.g. https://upscale.example.com")
    _flag(g, "--permessage-deflate", type=bool, default=False, help="offer WebSocket compression")
    _flag(
        g,
        "--http-port",
        type=_port_or_off,
        default=8788,
        help="port for REST (POST /v1 with a JSON array of tasks) and the HTTP endpoints; 'off': no REST",
    )
    _flag(
        g,
        "--cors-origin",
        help="browser origin allowed to call REST, e.g. https://app.example.com, or '*' for any "
        "(repeatable; env: comma-separated; default none)",
        action="append",
    )


def _auth_flags(parser) -> None:
    g = parser.add_argument_group("authentication")
    _flag(
        g,
        "--api-key",
        help="accepted API key (repeatable; the variable takes a comma-separated list). Without any, "
        "a loopback host accepts every key and another host refuses to start",
        env="LATENT_UPSCALER_API_KEYS",
        action="append",
    )


def add_batching_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The engine's batching flags (``serve``, ``worker``, and ``upscale`` without ``--url``); returns their group."""
    g = parser.add_argument_group("batching")
    _flag(g, "--max-batch-rows", type=int, default=16, help="UNet rows per call (a CFG task takes two)")
    _flag(
        g,
        "--batching",
        default="continuous",
        choices=BATCHING,
        help="'continuous' (step-level) or 'static' (for comparison: a batch of same-size "
        "requests runs to completion and its results go out together)",
    )
    _flag(
        g,
        "--group-policy",
        default="deadline",
        choices=GROUP_POLICIES,
        help="which latent-size group each UNet call serves: 'deadline' (the group holding the task "
        "that would finish first if served alone: short tasks first, then first come first served; "
        "the shortest latency tail) or 'round-robin' (groups take turns)",
    )
    _flag(
        g,
        "--torch-threads",
        type=int,
        help="CPU only: torch threads for each of the UNet and VAE threads (default: half the cores)",
    )
    _flag(
        g,
        "--vae-overlap",
        default="auto",
        choices=VAE_OVERLAP,
        help="let VAE encodes/decodes run while a UNet step runs: 'on', 'off', or 'auto' (on for a CPU, "
        "off for CUDA, where they would compete for GPU memory)",
    )
    _flag(
        g,
        "--engine-queue",
        type=int,
        default=1024,
        help="tasks admitted to the engine; beyond: rateLimitExceeded",
    )
    return g


def _limit_flags(parser) -> None:
    g = parser.add_argument_group("limits")
    _flag(
        g,
        "--max-frame-bytes",
        type=int,
        default=32 * 2**20,
        help="largest client frame, and REST request body (beyond: 413)",
    )
    _flag(g, "--max-tasks-per-frame", type=int, default=256, help="tasks in one frame or REST request")
    _flag(g, "--max-in-flight-per-connection", type=int, default=64, help="unfinished tasks per connection")
    _flag(g, "--max-in-flight-per-key", type=int, default=256, help="unfinished tasks per API key")
    _flag(g, "--max-steps", type=int, default=100, help="largest settings.steps")
    _flag(g, "--max-input-pixels", type=int, default=2048 * 2048, help="largest input image, in pixels")
    _flag(g, "--max-input-bytes", type=int, default=32 * 2**20, help="largest input image, in bytes")


def _time_flags(parser) -> None:
    g = parser.add_argument_group("timeouts and retention")
    _flag(g, "--idle-timeout", type=float, default=120.0, help="close a socket silent this many seconds")
    _flag(
        g,
        "--rest-timeout",
        type=float,
        default=300.0,
        help="seconds a sync REST request waits for its tasks; then the unfinished ones are answered "
        "'timeout' (504) and go on (getResponse, or the same request again, gets them)",
    )
    _flag(g, "--session-ttl", type=float, default=120.0, help="seconds undelivered results wait for a resume")
    _flag(g, "--output-ttl", type=float, default=3600.0, help="default lifetime of stored images, seconds")
    _flag(
        g,
        "--max-ttl",
        type=float,
        default=7 * 86400.0,
        help="largest `ttl` a task may ask for its output, seconds (beyond: invalidTTL); default 7 days",
    )
    _flag(g, "--record-ttl", type=float, default=3600.0, help="seconds getResponse remembers a finished task")
    _flag(g, "--shutdown-grace", type=float, default=30.0, help="seconds in-flight tasks get on SIGTERM")


def _image_store_flags(parser, default: str) -> None:
    g = parser.add_argument_group(
        "image store",
        "S3 credentials come from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_SESSION_TOKEN, AWS_WEB_IDENTITY_TOKEN_FILE, container or instance roles) or AWS_PROFILE's "
        "keys in ~/.aws/credentials; never from a flag.",
    )
    shared = "" if default == "memory" else "; every gateway and worker of a cluster must use the same"
    _flag(
        g,
        "--image-store",
        default=default,
        help="where uploaded, input and output images live: memory"
        + (", redis" if default == "redis" else "")
        + f" or s3://BUCKET/PREFIX (an S3-compatible bucket){shared}",
    )
    _flag(
        g,
        "--s3-endpoint-url",
        help="the S3 API's URL for a store other than AWS (MinIO, R2, Ceph, …), e.g. http://minio:9000; "
        "the operator's own endpoint, exempt from the SSRF guard",
    )
    _flag(g, "--s3-region", help="the bucket's region; default AWS_REGION, the AWS config file, or us-east-1")
    _flag(
        g,
        "--s3-presign",
        type=bool,
        default=False,
        help="imageURL and GET /images/… give presigned URLs of the store that expire with the image "
        "(clients must reach the endpoint)" + shared,
    )
    _flag(
        g,
        "--s3-timeout",
        type=float,
        default=10.0,
        help="seconds one store operation may take, retries included; then the task gets serviceUnavailable",
    )


def _outbound_flags(parser) -> None:
    g = parser.add_argument_group("outbound HTTP")
    _flag(
        g,
        "--allow-private-networks",
        type=bool,
        default=False,
        help="allow image URLs/webhooks/upload endpoints on private hosts",
    )
    _flag(g, "--price-per-gpu-hour", type=float, default=2.0, help="basis of `cost` (includeCost)")
    _flag(
        g,
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        help="DEBUG, INFO, WARNING or ERROR",
    )


def _event_loop_flag(parser) -> None:
    _flag(
        parser.add_argument_group("process"),
        "--event-loop",
        default="auto",
        choices=EVENT_LOOPS,
        help="the asyncio event loop: 'uvloop' (libuv; less time per message, measured in "
        "benchmarks/README.md), 'asyncio' (the standard library's), or 'auto' (uvloop where installed)",
    )


def _loop_factory(choice: str):
    """The event loop ``--event-loop`` asks for (None: the standard library's)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ValueError("--event-loop uvloop: uvloop is not installed (pip install uvloop)") from None
        return None
    return uvloop.new_event_loop


def _observability_flags(parser, where: str) -> None:
    g = parser.add_argument_group("logs and metrics")
    _flag(
        g,
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="'text' (one line per record) or 'json' (one JSON object per line, with taskUUID, "
        "connectionSessionUUID, worker id and error code where they apply, and a line per task)",
    )
    _flag(
        g,
        "--metrics",
        type=bool,
        default=True,
        help=f"Prometheus metrics at GET /metrics ({where}, no API key); --no-metrics keeps none",
    )
    _flag(
        g,
        "--metrics-port",
        type=int,
        help="serve /metrics on this port instead (same --host), e.g. one only the monitoring network "
        "reaches",
    )


def _cluster_flags(parser) -> None:
    g = parser.add_argument_group("cluster")
    _flag(
        g,
        "--redis-url",
        required="LATENT_UPSCALER_REDIS_URL" not in os.environ,
        help="the cluster's Redis (7.0 or newer, or Valkey), e.g. redis://HOST:6379/0 "
        "(a password goes in the URL: redis://:PASSWORD@HOST:6379/0)",
    )
    _flag(
        g,
        "--claim-timeout",
        type=float,
        default=15.0,
        help="seconds of silence after which a worker's tasks go to another worker",
    )
    _flag(
        g,
        "--max-deliveries",
        type=int,
        default=3,
        help="deliveries of one task (its workers died or stalled each time) before it ends with an error",
    )
    _flag(
        g,
        "--max-queued",
        type=int,
        default=10_000,
        help="unfinished tasks queued in the whole cluster before new ones get rateLimitExceeded",
    )


# Flags → config fields. A role has a subset of the flags; what it lacks keeps the
# config's default.
_ENGINE_FIELDS = {
    "model": "model",
    "revision": "revision",
    "device": "device",
    "dtype": "dtype",
    "max_batch_rows": "max_batch_rows",
    "batching": "mode",
    "group_policy": "group_policy",
    "torch_threads": "torch_threads",
    "vae_overlap": "vae_overlap",
    "engine_queue": "max_queue",
    "max_input_pixels": "max_input_pixels",
    "max_steps": "max_steps",
}
_GATEWAY_FIELDS = (
    "host",
    "port",
    "public_url",
    "permessage_deflate",
    "max_frame_bytes",
    "max_tasks_per_frame",
    "max_in_flight_per_connection",
    "max_in_flight_per_key",
    "max_steps",
    "max_input_bytes",
    "idle_timeout",
    "rest_timeout",
    "session_ttl",
    "output_ttl",
    "max_ttl",
    "record_ttl",
    "shutdown_grace",
    "allow_private_networks",
    "price_per_gpu_hour",
    "metrics",
    "metrics_port",
)
_CHOICES = {
    "batching": BATCHING,
    "group_policy": GROUP_POLICIES,
    "vae_overlap": VAE_OVERLAP,
    "log_format": LOG_FORMATS,
}


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The :class:`EngineConfig` of whichever model, batching and limit flags ``args`` has."""
    # argparse checks `choices` only on the command line, not on defaults read from the
    # environment: check those here (a ValueError is a clear one-line error in main()).
    for name, choices in _CHOICES.items():
        if hasattr(args, name) and getattr(args, name) not in choices:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} ({_env_name(flag)}) must be one of {', '.join(choices)}")
    if getattr(args, "torch_threads", None) is not None and args.torch_threads < 1:
        raise ValueError("--torch-threads (LATENT_UPSCALER_TORCH_THREADS) must be at least 1")
    return EngineConfig(**{field: getattr(args, flag) for flag, field in _ENGINE_FIELDS.items() if hasattr(args, flag)})


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    rest = {"http_port": args.http_port} if hasattr(args, "port") and hasattr(args, "http_port") else {}
    if hasattr(args, "port") and args.http_port is not None and args.http_port == args.port and args.port != 0:
        raise ValueError("--http-port (LATENT_UPSCALER_HTTP_PORT) must differ from --port, or be 'off'")
    engine = engine_config_from_args(args)
    return GatewayConfig(
        **{name: getattr(args, name) for name in _GATEWAY_FIELDS if hasattr(args, name)},
        api_keys=tuple(getattr(args, "api_key", None) or ()),
        model_aliases=tuple(getattr(args, "model_alias", None) or ()),
        cors_origins=tuple(getattr(args, "cors_origin", None) or ()),
        **rest,
        engine=engine,
        image_store=image_store_from_args(args),
    )


def image_store_from_args(args: argparse.Namespace) -> ImageStoreConfig:
    if not hasattr(args, "image_store"):
        return ImageStoreConfig()
    if args.s3_timeout <= 0:
        raise ValueError("--s3-timeout (LATENT_UPSCALER_S3_TIMEOUT) must be positive")
    return ImageStoreConfig.parse(
        args.image_store,
        endpoint_url=args.s3_endpoint_url,
        region=args.s3_region,
        presign=args.s3_presign,
        timeout=args.s3_timeout,
    )


def cluster_from_args(args: argparse.Namespace) -> ClusterConfig:
    if args.claim_timeout <= 0 or args.max_deliveries < 1 or args.max_queued < 0:
        raise ValueError(
            "--claim-timeout must be positive, --max-deliveries at least 1 and --max-queued at least 0"
        )
    member_id = getattr(args, "worker_id", None) or f"{socket.gethostname()}-{os.getpid()}"
    if args.command == "gateway":
        member_id = f"gateway-{member_id}"
    return ClusterConfig(
        redis_url=args.redis_url,
        member_id=member_id,
        claim_timeout=args.claim_timeout,
        max_deliveries=args.max_deliveries,
        max_queued=args.max_queued,
    )


async def run_until_signalled(role) -> None:
    """Run ``role(stop)`` until SIGTERM or SIGINT sets ``stop``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    logging.getLogger("gateway").info("event loop: %s", type(loop).__module__.split(".")[0])
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await role(stop)


async def serve_until_signalled(config: GatewayConfig, stop: asyncio.Event) -> None:
    from .server import GatewayServer

    server = GatewayServer(config)
    await server.start()
    await stop.wait()
    logging.getLogger("gateway").info(
        "shutting down: finishing in-flight tasks (grace %.0f s)", config.shutdown_grace
    )
    await server.close()


def _role(args: argparse.Namespace, config: GatewayConfig):
    """The coroutine function that runs the chosen command until ``stop`` is set."""
    if args.command == "serve":

        async def serve(stop: asyncio.Event) -> None:
            await serve_until_signalled(config, stop)

        return serve
    from . import logs
    from .cluster import roles

    cluster = cluster_from_args(args)
    if args.command == "gateway":
        logs.set_process_fields(gatewayId=cluster.member_id)
        return lambda stop: roles.run_gateway(config, cluster, stop)
    logs.set_process_fields(workerId=cluster.member_id)
    return lambda stop: roles.run_worker(config, cluster, stop, http_port=args.http_port)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "upscale":
        from .cli_upscale import main as upscale_main

        return upscale_main(args, engine_config_from_args)
    level = args.log_level.upper()
    if level not in LOG_LEVELS:
        print(f"latent-upscaler: --log-level must be one of {', '.join(LOG_LEVELS)}", file=sys.stderr)
        return 2
    from . import logs

    try:
        config = config_from_args(args)
        # Before anything imports huggingface_hub (it reads its progress-bar switch once).
        # The S3 image store's credentials are as secret as the API keys.
        aws = [os.environ.get(name, "") for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
        logs.configure(level, args.log_format, secrets=[*config.api_keys, *aws])
    except ValueError as exc:
        print(f"latent-upscaler: {exc}", file=sys.stderr)
        return 2
    from engine.loader import ModelLoadError

    try:
        with asyncio.Runner(loop_factory=_loop_factory(args.event_loop)) as runner:
            runner.run(run_until_signalled(_role(args, config)))
    except ModelLoadError as exc:
        print(f"latent-upscaler: {exc}", file=sys.stderr)
        return _leave(2, argv)
    except (ValueError, OSError) as exc:
        print(f"latent-upscaler: {exc}", file=sys.stderr)
        return _leave(2, argv)
    return _leave(0, argv)


def _leave(code: int, argv: list[str] | None) -> int:
    """The exit code; a process (``argv`` None) that loaded obstore, the S3 client, ends
    here without finalizing the interpreter (its logs flushed): obstore's Rust threads
    may still wake the event loop while CPython finalizes, and 3.11 then aborts the
    process (SIGABRT, seen once in ten short runs) after a clean shutdown."""
    if argv is None and "obstore" in sys.modules:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
