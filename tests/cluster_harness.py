"""Real processes for cluster tests and benchmarks: a ``redis-server`` and the two roles.

Each process runs on 127.0.0.1 on a free port, logs to a file, and is stopped by its
PID (faults are real signals: ``SIGKILL``, ``SIGSTOP``). Redis is Debian's
``redis-server`` (7.0 or newer), started with persistence off.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REDIS_SERVER = shutil.which("redis-server")
INSTALL_HINT = "install it with: apt-get install -y --no-install-recommends redis-server"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """``redis-server`` on a free port (or a given one, to restart it in place)."""

    def __init__(self, log_dir: Path, port: int | None = None) -> None:
        if REDIS_SERVER is None:
            raise FileNotFoundError(f"redis-server is not installed; {INSTALL_HINT}")
        self.port = port or free_port()
        self.log = log_dir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "no", "--logfile", str(self.log)]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.ping():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server did not start; see {self.log}")
            time.sleep(0.05)
        return self

    def ping(self) -> bool:
        return self.command(b"PING") == b"+PONG"

    def command(self, *words: bytes) -> bytes | None:
        """One command in RESP; the first line of the answer (None if unreachable)."""
        request = b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(request)
                return s.recv(65536).split(b"\r\n", 1)[0]
        except OSError:
            return None

    def calls(self, command: str) -> int:
        """How many times ``command`` ran (scripts' calls included) since the last
        ``CONFIG RESETSTAT``, from ``INFO commandstats``."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
            reply = b""
            while not reply.endswith(b"\r\n") or reply.count(b"\r\n") < 2 or len(reply) < _bulk_end(reply):
                reply += s.recv(65536)
        for line in reply.decode().splitlines():
            if line.startswith(f"cmdstat_{command.lower()}:"):
                return int(line.split("calls=", 1)[1].split(",", 1)[0])
        return 0

    def flush(self) -> None:
        assert self.command(b"FLUSHALL") == b"+OK"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Role:
    """``python -m gateway serve|gateway|worker …`` as a real process."""

    def __init__(self, kind: str, name: str, args: list[str], log_dir: Path, env: dict | None = None) -> None:
        self.kind, self.name = kind, name
        self.port = free_port()  # the gateway's port, or the worker's --http-port
        self.log = log_dir / f"{kind}-{name}.log"
        command = [sys.executable, "-m", "gateway", kind, *args]
        command += ["--http-port" if kind == "worker" else "--port", str(self.port)]
        self.rest_port = None
        if kind != "worker":  # the REST transport, on a port of its own
            self.rest_port = free_port()
            command += ["--http-port", str(self.rest_port)]
        if kind == "worker":
            command += ["--worker-id", name]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def rest(self) -> str:
        """The REST endpoint (``POST``) of a gateway or serve."""
        return f"http://127.0.0.1:{self.rest_port}/v1"

    async def get(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=5) as client:
            return await client.get(self.http + path)

    async def ready(self) -> bool:
        try:
            return (await self.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def wait_ready(self, timeout: float = 60) -> Role:
        deadline = time.monotonic() + timeout
        while not await self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} {self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} {self.name} not ready in {timeout} s:\n{self.tail()}")
            await asyncio.sleep(0.1)
        return self

    async def stats(self) -> dict:
        return (await self.get("/stats")).json()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> bool:
        """SIGTERM (after SIGCONT, should it be stopped); False if it had to be killed."""
        self.terminate()
        return self.wait_stopped()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()

    def wait_stopped(self, timeout: float = 15) -> bool:
        """Wait for the process to exit; SIGKILL it after ``timeout`` s (then False)."""
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return False

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Cluster:
    """Gateways and workers on one Redis; every process is stopped by :meth:`close`."""

    def __init__(self, redis: RedisProcess, log_dir: Path, *, common: list[str] = ()) -> None:
        self.redis = redis
        self.log_dir = log_dir
        self.common = ["--redis-url", redis.url, *common]
        self.roles: list[Role] = []

    def gateway(self, name: str, *extra: str) -> Role:
        return self._add(Role("gateway", name, [*self.common, *extra], self.log_dir))

    def worker(self, name: str, *extra: str, model: str = "tiny") -> Role:
        args = [*self.common, "--model", model, "--device", "cpu", *extra]
        return self._add(Role("worker", name, args, self.log_dir))

    def _add(self, role: Role) -> Role:
        self.roles.append(role)
        return role

    async def ready(self, *roles: Role, timeout: float = 90) -> None:
        await asyncio.gather(*(role.wait_ready(timeout) for role in roles))

    def close(self) -> list[str]:
        """SIGTERM every process at once; the ones that did not exit by themselves (killed)."""
        for role in self.roles:
            role.terminate()
        return [f"{role.kind} {role.name}" for role in self.roles if not role.wait_stopped()]

    def logs(self) -> str:
        return "\n\n".join(f"== {r.kind} {r.name} ==\n{r.tail()}" for r in self.roles)


def _bulk_end(reply: bytes) -> int:
    """The length of a whole RESP bulk string reply whose header ``reply`` starts with."""
    header, _, _ = reply.partition(b"\r\n")
    return len(header) + 2 + int(header[1:]) + 2
