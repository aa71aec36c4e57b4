"""``latent-upscaler serve`` (also ``python -m gateway serve``): the command line.

Every flag has an environment variable, ``LATENT_UPSCALER_<FLAG>`` (upper case,
dashes as underscores); a flag on the command line wins over the variable.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from engine.config import DEFAULT_MODEL, VAE_OVERLAP, EngineConfig

from .config import GatewayConfig

ENV_PREFIX = "LATENT_UPSCALER_"
BATCHING = ("continuous", "static")
GROUP_POLICIES = ("deadline", "round-robin")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


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
        help="serve the WebSocket and REST APIs",
        description="Serve the Runware-compatible WebSocket API (ws://HOST:PORT/v1) and its HTTP endpoints "
        "(/images/…, /healthz, /readyz) on one port, and REST (POST http://HOST:HTTP_PORT/v1) with the "
        "same endpoints on another. Each flag has an environment variable.",
    )
    g = s.add_argument_group("model")
    _flag(g, "--model", default=DEFAULT_MODEL, help="hub id, local folder, or 'tiny' (offline test model)")
    _flag(g, "--revision", help="hub revision (the default model is pinned to one with safetensors)")
    _flag(g, "--device", help="torch device, e.g. cuda, cuda:1, cpu; default CUDA when present")
    _flag(g, "--dtype", help="fp32, fp16 or bf16; default fp16 on CUDA, fp32 on CPU")
    _flag(
        g,
        "--model-alias",
        help="extra accepted `model` value (repeatable; env: comma-separated)",
        action="append",
    )
    g = s.add_argument_group("network")
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
    g = s.add_argument_group("authentication")
    _flag(
        g,
        "--api-key",
        help="accepted API key (repeatable; the variable takes a comma-separated list). Without any, "
        "a loopback host accepts every key and another host refuses to start",
        env="LATENT_UPSCALER_API_KEYS",
        action="append",
    )
    g = s.add_argument_group("batching")
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
    g = s.add_argument_group("limits")
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
    g = s.add_argument_group("timeouts and retention")
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
    _flag(g, "--record-ttl", type=float, default=3600.0, help="seconds getResponse remembers a finished task")
    _flag(g, "--shutdown-grace", type=float, default=30.0, help="seconds in-flight tasks get on SIGTERM")
    g = s.add_argument_group("outbound HTTP")
    _flag(
        g,
        "--allow-private-networks",
        type=bool,
        default=False,
        help="allow image URLs/webhooks to private hosts",
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
    return parser


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    # argparse checks `choices` only on the command line, not on defaults read from the
    # environment: check those here (a ValueError is a clear one-line error in main()).
    if args.batching not in BATCHING:
        raise ValueError(f"--batching (LATENT_UPSCALER_BATCHING) must be one of {', '.join(BATCHING)}")
    if args.group_policy not in GROUP_POLICIES:
        raise ValueError(
            f"--group-policy (LATENT_UPSCALER_GROUP_POLICY) must be one of {', '.join(GROUP_POLICIES)}"
        )
    if args.vae_overlap not in VAE_OVERLAP:
        raise ValueError(
            f"--vae-overlap (LATENT_UPSCALER_VAE_OVERLAP) must be one of {', '.join(VAE_OVERLAP)}"
        )
    if args.torch_threads is not None and args.torch_threads < 1:
        raise ValueError("--torch-threads (LATENT_UPSCALER_TORCH_THREADS) must be at least 1")
    if args.http_port is not None and args.http_port == args.port and args.port != 0:
        raise ValueError("--http-port (LATENT_UPSCALER_HTTP_PORT) must differ from --port, or be 'off'")
    keys = list(args.api_key or [])
    aliases = list(args.model_alias or [])
    engine = EngineConfig(
        model=args.model,
        revision=args.revision,
        device=args.device,
        dtype=args.dtype,
        max_batch_rows=args.max_batch_rows,
        mode=args.batching,
        group_policy=args.group_policy,
        torch_threads=args.torch_threads,
        vae_overlap=args.vae_overlap,
        max_queue=args.engine_queue,
        max_input_pixels=args.max_input_pixels,
        max_steps=args.max_steps,
    )
    return GatewayConfig(
        host=args.host,
        port=args.port,
        public_url=args.public_url,
        permessage_deflate=args.permessage_deflate,
        http_port=args.http_port,
        cors_origins=tuple(args.cors_origin or []),
        api_keys=tuple(keys),
        model_aliases=tuple(aliases),
        max_frame_bytes=args.max_frame_bytes,
        max_tasks_per_frame=args.max_tasks_per_frame,
        max_in_flight_per_connection=args.max_in_flight_per_connection,
        max_in_flight_per_key=args.max_in_flight_per_key,
        max_steps=args.max_steps,
        max_input_bytes=args.max_input_bytes,
        idle_timeout=args.idle_timeout,
        rest_timeout=args.rest_timeout,
        session_ttl=args.session_ttl,
        output_ttl=args.output_ttl,
        record_ttl=args.record_ttl,
        shutdown_grace=args.shutdown_grace,
        allow_private_networks=args.allow_private_networks,
        price_per_gpu_hour=args.price_per_gpu_hour,
        engine=engine,
    )


async def serve_until_signalled(config: GatewayConfig) -> None:
    from .server import GatewayServer

    server = GatewayServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger("gateway").info(
        "shutting down: finishing in-flight tasks (grace %.0f s)", config.shutdown_grace
    )
    await server.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level.upper()
    if level not in LOG_LEVELS:
        print(f"latent-upscaler: --log-level must be one of {', '.join(LOG_LEVELS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from engine.loader import ModelLoadError

    try:
        config = config_from_args(args)
        asyncio.run(serve_until_signalled(config))
    except ModelLoadError as exc:
        print(f"latent-upscaler: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"latent-upscaler: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
