"""``latent-upscaler upscale INPUT...``: upscale files and folders, here or on any server.

    latent-upscaler upscale photo.png --model tiny        # photo.2x.png beside it; the engine runs here
    latent-upscaler upscale photos/ --out big/ --url ws://gpu-box:8787/v1 --api-key "$KEY"
    find . -name '*.jpg' | latent-upscaler upscale - --json > results.jsonl

The work is :class:`client.stream.BatchClient`'s; this module is the command line around it.

Without ``--url`` it starts the real :class:`~gateway.server.GatewayServer` in this
process, on an ephemeral 127.0.0.1 port with a random one-run API key, and streams to it
over the WebSocket exactly as it would to a remote server. One code path for both modes
(resume, errors, outputs), and "same seed, same bytes as the server" holds by
construction, because it *is* the server; loopback costs microseconds per image, the
model tens of milliseconds at the least.

Exit status: 0 when every input was upscaled (or skipped: its output existed), 1 when
some failed (each listed at the end with its error) or the server was lost for good,
2 when nothing could be attempted (a bad flag, a named input that is not there, a URL
that does not answer, a refused API key, a model that does not load), 128 + the signal
(130 for Ctrl-C) when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["add_parser", "main"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMAT_CHOICES = ("png", "jpg", "webp")
URL_CONCURRENCY = 32  # 2 × the server's default --max-batch-rows, under its 64 per connection


class UsageError(Exception):
    """A run that cannot start as asked (exit 2)."""


def add_parser(sub, flag: Callable, add_model_flags: Callable, add_batching_flags: Callable) -> None:
    """Register ``upscale`` on the ``latent-upscaler`` subcommands. ``flag`` is
    ``gateway.__main__._flag``; the model and batching flags are ``serve``'s own."""
    p = sub.add_parser(
        "upscale",
        help="upscale image files and folders (on this machine, or on a server with --url)",
        description="Upscale every INPUT 2x: photo.png → photo.2x.png beside it (or in --out). Without "
        "--url the engine runs in this process (--model, --device, --dtype and the batching flags as for "
        "`serve`); with --url the images stream over one WebSocket to a running server. Inputs whose "
        "output exists are skipped, so a stopped run continues where it stopped. Exit status: 0 all ok, "
        "1 some failed, 2 usage error, 130 interrupted. Each flag has an environment variable.",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, folders (walked recursively: every file Pillow opens), or '-' to read paths "
        "from stdin, one a line",
    )
    g = p.add_argument_group("outputs")
    flag(
        g,
        "--out",
        help="folder for the outputs (default: beside each input). Files named on the command line or "
        "stdin go in by name; a folder's files keep their path below that folder",
    )
    flag(
        g,
        "--format",
        choices=FORMAT_CHOICES,
        help="output format; default: the input's own if png, jpg or webp, else png",
    )
    flag(g, "--quality", type=int, help="JPG/WEBP quality, 20–99 (server default 95)")
    flag(g, "--overwrite", type=bool, default=False, help="upscale inputs whose output already exists")
    g = p.add_argument_group("upscaling")
    flag(g, "--steps", type=int, help="denoising steps (server default 20)")
    flag(g, "--cfg", type=float, help="CFGScale: above 1, classifier-free guidance (server default 1.0)")
    flag(
        g,
        "--seed",
        type=int,
        help="seed for every image (same seed, same bytes); default: a random one per image, "
        "printed by --json",
    )
    flag(g, "--prompt", help="positive prompt")
    flag(g, "--negative-prompt", help="negative prompt (used only with --cfg above 1)")
    g = p.add_argument_group("server")
    flag(g, "--url", help="a running server, ws://HOST:PORT/v1; without it the engine runs here")
    flag(g, "--api-key", help="API key for --url")
    flag(
        g,
        "--concurrency",
        type=int,
        help="tasks in flight at once; default: 2 × --max-batch-rows here, "
        f"{URL_CONCURRENCY} with --url (servers take 64 per connection by default)",
    )
    g = p.add_argument_group("run")
    flag(g, "--fail-fast", type=bool, default=False, help="stop sending at the first failure")
    flag(g, "--json", type=bool, default=False, help="print one JSON line per finished input on stdout")
    flag(
        g,
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=LOG_LEVELS,
        help="DEBUG, INFO, WARNING or ERROR",
    )
    flag(
        g,
        "--log-format",
        default="text",
        choices=("text", "json"),
        help="'text' or 'json' (one JSON object per line) for the log on stderr",
    )
    g = add_model_flags(p)
    g.description = "without --url only: the engine that runs in this process"
    g = add_batching_flags(p)
    g.description = "without --url only"


def main(args: argparse.Namespace, engine_config_from_args: Callable) -> int:
    """Run ``upscale``; returns the exit status."""
    level = str(args.log_level).upper()
    if level not in LOG_LEVELS:
        print(f"latent-upscaler: --log-level must be one of {', '.join(LOG_LEVELS)}", file=sys.stderr)
        return 2
    from . import logs

    try:
        text = "%(levelname)s %(name)s: %(message)s"
        logs.configure(level, args.log_format, secrets=[args.api_key or ""], fmt_text=text)
        plan = _Plan.from_args(args, engine_config_from_args)
    except (UsageError, ValueError) as exc:
        print(f"latent-upscaler: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(plan.run())
    except KeyboardInterrupt:  # a Ctrl-C before the signal handlers were in place
        return 130


class _Plan:
    """A checked command line, and the run it describes."""

    def __init__(self, args: argparse.Namespace, settings, naming, engine, concurrency: int) -> None:
        self.args = args
        self.settings = settings
        self.naming = naming
        self.engine = engine  # EngineConfig, or None with --url
        self.concurrency = concurrency
        self.signal: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, engine_config_from_args: Callable) -> _Plan:
        from client.inputs import FORMATS, Naming
        from client.stream import TaskSettings

        _check(args.format is None or args.format in FORMAT_CHOICES, "--format must be png, jpg or webp")
        _check(args.quality is None or 20 <= args.quality <= 99, "--quality must be 20–99")
        _check(args.steps is None or args.steps >= 1, "--steps must be at least 1")
        _check(args.cfg is None or args.cfg >= 0, "--cfg must be 0 or more")
        _check(args.seed is None or 0 <= args.seed < 2**63, "--seed must be 0 … 9223372036854775807")
        _check(args.concurrency is None or args.concurrency >= 1, "--concurrency must be at least 1")
        out = Path(args.out) if args.out else None
        _check(out is None or not out.exists() or out.is_dir(), f"--out {out} exists and is not a folder")
        for name in args.inputs:
            _check(name == "-" or Path(name).exists(), f"{name}: no such file or folder")
        if args.url is None:
            engine = engine_config_from_args(args)
            concurrency = args.concurrency or 2 * engine.max_batch_rows
        else:
            _check(args.url.startswith(("ws://", "wss://")), f"--url {args.url} is not ws://HOST:PORT/v1")
            engine, concurrency = None, args.concurrency or URL_CONCURRENCY
        settings = TaskSettings(
            quality=args.quality,
            steps=args.steps,
            cfg=args.cfg,
            seed=args.seed,
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
        )
        naming = Naming(out, FORMATS[args.format] if args.format else None)
        return cls(args, settings, naming, engine, concurrency)

    async def run(self) -> int:
        from client.inputs import expand
        from client.report import Reporter
        from client.stream import AuthRejected, BatchClient, ConnectFailed

        args = self.args
        tty = sys.stdout.isatty() and sys.stderr.isatty()
        reporter = Reporter(json_lines=args.json, progress=tty)
        main_task = asyncio.current_task()
        client: BatchClient | None = None

        def interrupted(signum: int) -> None:
            if self.signal is None and client is not None:
                self.signal = signum
                reporter.message(
                    "latent-upscaler: stopping: finishing the images already sent (Ctrl-C again to quit now)"
                )
                client.stop()
            else:
                self.signal = signum
                main_task.cancel()

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, interrupted, signum)
        server = None

        async def endpoint() -> tuple[str, str]:
            nonlocal server
            if self.engine is None:
                return args.url, args.api_key or ""
            server, key = await self._start_local_server(tty)
            return server.url, key

        try:
            client = BatchClient(
                endpoint,
                self.settings,
                report=reporter.outcome,
                concurrency=self.concurrency,
                overwrite=args.overwrite,
                fail_fast=args.fail_fast,
            )
            if tty and "-" not in args.inputs:
                _count_in_background(args.inputs, self.naming, reporter, loop)
            await client.run(expand(args.inputs, self.naming, stdin=sys.stdin))
        except AuthRejected as exc:
            print(f"latent-upscaler: the server refused the API key ({exc}); pass --api-key", file=sys.stderr)
            return 2
        except (ConnectFailed, UsageError) as exc:
            print(f"latent-upscaler: {exc}", file=sys.stderr)
            return 2
        except asyncio.CancelledError:
            pass  # quit now (a second Ctrl-C)
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            if server is not None:
                await server.close(grace=0 if self.signal else 5)
        fatal = client.fatal if client is not None else None
        started = client.started_at if client is not None and client.started_at else time.monotonic()
        reporter.close(time.monotonic() - started, interrupted=self.signal is not None, fatal=fatal)
        if self.signal is not None:
            return 128 + self.signal
        return 1 if reporter.failed or fatal else 0

    async def _start_local_server(self, tty: bool):
        from engine.loader import ModelLoadError

        from .config import GatewayConfig
        from .server import GatewayServer

        key = secrets.token_urlsafe(24)  # for this run only: no other local process can use it
        limit = max(64, self.concurrency)
        config = GatewayConfig(
            host="127.0.0.1",
            port=0,
            api_keys=(key,),
            max_in_flight_per_connection=limit,
            max_in_flight_per_key=max(256, limit),
            output_ttl=600.0,
            store_bytes=512 * 2**20,
            engine=self.engine,
        )
        if tty:
            print(f"latent-upscaler: loading {self.engine.model} …", file=sys.stderr, flush=True)
        else:
            _quiet_loading_bars()
        server = GatewayServer(config)
        try:
            await server.start()
        except ModelLoadError as exc:
            raise UsageError(str(exc)) from exc
        return server, key


def _quiet_loading_bars() -> None:
    """diffusers' and transformers' loading bars, which would fill a log that is not a terminal."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def _count_in_background(inputs: list[str], naming, reporter, loop: asyncio.AbstractEventLoop) -> None:
    """Walk the inputs once more on a daemon thread, only counting, so the bar gets an ETA."""
    from client.inputs import expand

    def count() -> None:
        total = sum(1 for _ in expand(inputs, naming))
        with contextlib.suppress(RuntimeError):  # the run ended first
            loop.call_soon_threadsafe(reporter.set_total, total)

    threading.Thread(target=count, name="count-inputs", daemon=True).start()
