"""Shared fixtures: a gateway served in-process on a free 127.0.0.1 port, and a client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import time
import uuid

import orjson
import pytest
from PIL import Image
from websockets.asyncio.client import connect

from engine.client import NullEngineClient
from engine.config import EngineConfig
from gateway.config import GatewayConfig
from gateway.server import GatewayServer

TINY = EngineConfig(model="tiny", device="cpu", dtype="fp32", max_batch_rows=16)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(port: int, *extra: str, model: str = "tiny", http_port: int | None = None) -> list[str]:
    """``python -m gateway serve`` (on the tiny model by default), for tests that need a real process.
    REST is off unless ``http_port`` is given (the command line's default port is fixed)."""
    import sys

    return [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--model",
        model,
        "--device",
        "cpu",
        "--port",
        str(port),
        "--http-port",
        "off" if http_port is None else str(http_port),
        *extra,
    ]


class FakeClock:
    """A monotonic clock that tests move by hand."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def png_bytes(width: int, height: int, color=(200, 30, 30), mode: str = "RGB") -> bytes:
    image = Image.new(mode, (width, height), color if mode != "RGBA" else (*color, 128))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def upscale_task(image: str | None = None, **fields) -> dict:
    task = {
        "taskType": "imageUpscale",
        "taskUUID": str(uuid.uuid4()),
        "model": "runware:502@1",
        "inputImage": image if image is not None else data_uri(png_bytes(40, 24)),
        "outputType": "base64Data",
        "outputFormat": "PNG",
        "settings": {"steps": 2},
    }
    settings = fields.pop("settings", {})
    task.update(fields)
    task["settings"].update(settings)
    return task


def decode_result_image(item: dict) -> Image.Image:
    if "imageBase64Data" in item:
        return Image.open(io.BytesIO(base64.b64decode(item["imageBase64Data"])))
    uri = item["imageDataURI"]
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


class Client:
    """A raw protocol client: send task arrays, read frames, collect by taskUUID."""

    def __init__(self, ws) -> None:
        self.ws = ws

    async def send(self, payload) -> None:
        await self.ws.send(payload if isinstance(payload, (str, bytes)) else orjson.dumps(payload).decode())

    async def recv(self, timeout: float = 30.0) -> dict:
        return orjson.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def auth(self, key: str = "test-key", session: str | None = None) -> str:
        task = {"taskType": "authentication", "apiKey": key}
        if session:
            task["connectionSessionUUID"] = session
        await self.send([task])
        frame = await self.recv()
        assert "data" in frame, frame
        return frame["data"][0]["connectionSessionUUID"]

    async def error(self, payload) -> dict:
        await self.send(payload)
        frame = await self.recv()
        assert "errors" in frame and len(frame["errors"]) == 1, frame
        return frame["errors"][0]

    async def run(self, tasks: list[dict], timeout: float = 60.0) -> dict[str, list[dict]]:
        """Send ``tasks`` in one frame; wait until each has one terminal item. Returns
        every item per taskUUID (progress included), in arrival order."""
        await self.send(tasks)
        return await self.collect({t["taskUUID"] for t in tasks if "taskUUID" in t}, timeout)

    async def collect(self, uuids: set[str], timeout: float = 60.0) -> dict[str, list[dict]]:
        seen: dict[str, list[dict]] = {u: [] for u in uuids}
        pending = set(uuids)
        self.order: list[str] = []
        deadline = time.monotonic() + timeout
        while pending:
            frame = await self.recv(max(0.1, deadline - time.monotonic()))
            for item in frame.get("data", []) + frame.get("errors", []):
                seen.setdefault(item.get("taskUUID"), []).append(item)
                if item.get("status") != "processing" and item.get("taskUUID") in pending:
                    pending.discard(item["taskUUID"])
                    self.order.append(item["taskUUID"])
        return seen

    async def quiet(self, seconds: float = 0.3) -> list[dict]:
        """Frames that arrive within ``seconds`` (expected: none)."""
        frames = []
        with contextlib.suppress(TimeoutError):
            while True:
                frames.append(await self.recv(seconds))
        return frames


@contextlib.asynccontextmanager
async def serving(config: GatewayConfig | None = None, engine=None, clock=None, outbound=None, **overrides):
    config = config or GatewayConfig(port=0, **overrides)
    kwargs = {"clock": clock} if clock else {}
    if outbound is not None:
        kwargs["outbound"] = outbound
    server = GatewayServer(config, engine, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.close(grace=1)


@contextlib.asynccontextmanager
async def client(server: GatewayServer, key: str | None = "test-key", user_agent: str | None = None):
    headers = {"User-Agent": user_agent} if user_agent else None
    async with connect(server.url, max_size=64 * 2**20, additional_headers=headers) as ws:
        c = Client(ws)
        if key is not None:
            await c.auth(key)
        yield c


class HeldEngineClient(NullEngineClient):
    """The null engine, except that requests wait in :attr:`held` until :meth:`release`:
    a task stays in flight for as long as a test needs."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.held: list = []
        self.holding = True

    def _finish(self, request) -> None:
        if self.holding:
            self.held.append(request)
        else:
            super()._finish(request)

    def release(self, *, stop_holding: bool = False) -> None:
        """Answer every held request, in order; with ``stop_holding``, later ones at once."""
        self.holding = not stop_holding
        held, self.held = self.held, []
        for request in held:
            super()._finish(request)

    async def abort(self, request_ids) -> None:
        ids = set(request_ids)
        self.held = [r for r in self.held if r.request_id not in ids]
        await super().abort(ids)


async def wait_until(condition, timeout: float = 10.0) -> None:
    """Poll ``condition()`` until true (fails the test after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def null_server():
    async with serving(engine=NullEngineClient()) as server:
        yield server


class LocalHTTP:
    """A real HTTP server on 127.0.0.1 that serves files and records what it receives."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.files: dict[str, tuple[bytes, str]] = {}
        self.received: list[tuple[str, str, str | None, bytes]] = []
        self.fail_next = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _receive(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.received.append((self.command, self.path, self.headers.get("Content-Type"), body))
                status = 500 if outer.fail_next > 0 else 200
                outer.fail_next = max(0, outer.fail_next - 1)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT = _receive

            def do_GET(self):
                if self.path.startswith("/redirect"):
                    self.send_response(302)
                    self.send_header("Location", self.path.split("to=", 1)[1])
                    self.end_headers()
                    return
                body, media_type = outer.files.get(self.path, (b"not found", "text/plain"))
                self.send_response(200 if self.path in outer.files else 404)
                self.send_header("Content-Type", media_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture
def local_http():
    server = LocalHTTP()
    yield server
    server.close()
