"""Load generator: drives a gateway over real WebSockets or REST, as Runware clients would.

    python benchmarks/loadgen.py --url ws://127.0.0.1:8787/v1 --workload benchmarks/workloads/tiny.json \\
        --connections 4 --concurrency 16 --tasks 200            # closed loop
    python benchmarks/loadgen.py ... --rate 5 --tasks 200       # open loop, Poisson arrivals
    python benchmarks/loadgen.py --url http://127.0.0.1:8788/v1 ...   # REST: sync POSTs, keep-alive

Over REST (an ``http://`` URL) each task is one sync ``POST`` on an HTTP/1.1 keep-alive
connection, and a connection carries one request at a time: ``--connections`` is then
the most requests in flight.

Records per task the time to first progress and to the result, checks that every
``taskUUID`` got exactly one terminal answer, prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import orjson
from PIL import Image
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class TaskRecord:
    task_uuid: str
    size: str
    steps: int
    sent: float
    first_progress: float | None = None
    done: float | None = None
    ok: bool | None = None
    error: str | None = None
    terminal_count: int = 0
    cost: float | None = None


@dataclass
class Workload:
    """A mix of task templates, each ``weight`` times as likely as weight 1."""

    name: str
    mix: list[dict]
    model: str = "runware:502@1"
    images: dict[str, str] = field(default_factory=dict)  # "WxH" → data URI, made once

    @classmethod
    def load(cls, path: str | Path) -> Workload:
        spec = json.loads(Path(path).read_text())
        return cls(
            name=spec.get("name", Path(path).stem), mix=spec["mix"], model=spec.get("model", cls.model)
        )

    def sample(self, rng: random.Random) -> tuple[dict, str]:
        template = rng.choices(self.mix, weights=[t.get("weight", 1) for t in self.mix])[0]
        w, h = template["width"], template["height"]
        key = f"{w}x{h}"
        if key not in self.images:
            self.images[key] = _data_uri(w, h, len(self.images))
        steps = template.get("steps", 20)
        steps = rng.randint(*steps) if isinstance(steps, list) else steps
        task = {
            "taskType": "imageUpscale",
            "taskUUID": str(uuid.uuid4()),
            "model": self.model,
            "inputImage": self.images[key],
            "upscaleFactor": 2,
            "outputType": template.get("outputType", "base64Data"),
            "outputFormat": template.get("outputFormat", "JPG"),
            "includeProgress": template.get("includeProgress", True),
            "includeCost": template.get("includeCost", True),
            "settings": {
                "steps": steps,
                "CFGScale": template.get("CFGScale", 1.0),
                "positivePrompt": template.get("prompt", ""),
                "negativePrompt": template.get("negativePrompt", ""),
                "seed": rng.randrange(2**32),
            },
        }
        return task, key


def _data_uri(w: int, h: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class _Answers:
    """Matches the items of answer frames to task records by ``taskUUID``."""

    records: dict[str, TaskRecord]
    unknown: int

    def _on_frame(self, frame: dict, now: float) -> None:
        for item in frame.get("data", []):
            self._on_item(item, now, error=None)
        for item in frame.get("errors", []):
            self._on_item(item, now, error=item.get("code", "unknown"))

    def _on_item(self, item: dict, now: float, error: str | None) -> TaskRecord | None:
        """Record ``item``; the task's record if it is its first terminal answer."""
        record = self.records.get(item.get("taskUUID", ""))
        if record is None:
            self.unknown += 1
            return None
        if error is None and item.get("status") == "processing":
            record.first_progress = record.first_progress or now
            return None
        record.terminal_count += 1
        if record.terminal_count > 1:
            return None
        record.done, record.ok, record.error, record.cost = now, error is None, error, item.get("cost")
        return record


class Connection(_Answers):
    """One authenticated socket; results are matched to records by ``taskUUID``."""

    def __init__(self, url: str, api_key: str, records: dict[str, TaskRecord]) -> None:
        self.url, self.api_key, self.records = url, api_key, records
        self.waiters: dict[str, asyncio.Future] = {}
        self.unknown = 0

    async def __aenter__(self) -> Connection:
        self.ws = await connect(self.url, max_size=64 * 2**20, compression=None)
        await self.ws.send(orjson.dumps([{"taskType": "authentication", "apiKey": self.api_key}]).decode())
        reply = orjson.loads(await self.ws.recv())
        if "errors" in reply:
            raise RuntimeError(f"authentication failed: {reply['errors']}")
        self.reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        self.reader.cancel()
        await self.ws.close()

    async def run(self, task: dict, record: TaskRecord) -> None:
        future = asyncio.get_running_loop().create_future()
        self.waiters[task["taskUUID"]] = future
        record.sent = time.perf_counter()
        await self.ws.send(orjson.dumps([task]).decode())
        await future

    async def _read(self) -> None:
        async for message in self.ws:
            self._on_frame(orjson.loads(message), time.perf_counter())

    def _on_item(self, item: dict, now: float, error: str | None) -> TaskRecord | None:
        record = super()._on_item(item, now, error)
        future = self.waiters.pop(record.task_uuid, None) if record is not None else None
        if future is not None and not future.done():
            future.set_result(None)
        return record


class RestConnection(_Answers):
    """One HTTP/1.1 keep-alive connection: each task is a sync POST answered in full.

    A minimal client (one request at a time, Content-Length bodies, which is what the
    gateway sends) rather than aiohttp's, whose ~10x larger cost per request made the
    load generator, not the server, the bottleneck on a 2-core machine; the SDK tests
    drive the server with the real clients."""

    def __init__(self, url: str, api_key: str, records: dict[str, TaskRecord]) -> None:
        self.url, self.records = urlsplit(url), records
        self.head = (
            f"POST {self.url.path or '/'} HTTP/1.1\r\nHost: {self.url.netloc}\r\n"
            f"Content-Type: application/json\r\nAuthorization: Bearer {api_key}\r\n"
        ).encode()
        self.unknown = 0

    async def __aenter__(self) -> RestConnection:
        loop = asyncio.get_running_loop()
        _, self.protocol = await loop.create_connection(_HttpClient, self.url.hostname, self.url.port or 80)
        return self

    async def __aexit__(self, *exc) -> None:
        self.protocol.transport.close()

    async def run(self, task: dict, record: TaskRecord) -> None:
        body = orjson.dumps([task])
        record.sent = time.perf_counter()
        _, payload = await self.protocol.request(self.head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self._on_frame(orjson.loads(payload), time.perf_counter())


class _HttpClient(asyncio.Protocol):
    """HTTP/1.1 responses read off one connection, one request at a time (the open loop
    may start a task on a connection still busy: it waits its turn, as in a pool of one)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.turn = asyncio.Lock()

    def connection_made(self, transport) -> None:
        self.transport = transport

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        async with self.turn:
            self.waiter = asyncio.get_running_loop().create_future()
            self.transport.write(raw)
            return await self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        length = int(head.split(b"\r\ncontent-length:", 1)[1].split(b"\r\n", 1)[0])
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((int(head[9:12]), body))

    def connection_lost(self, exc) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("the server closed the connection"))


async def run_load(
    url: str | list[str],
    api_key: str,
    workload: Workload,
    *,
    tasks: int,
    connections: int = 4,
    concurrency: int | None = None,
    rate: float | None = None,
    seed: int = 0,
    timeout: float = 600.0,
) -> dict:
    """Closed loop with ``concurrency`` tasks in flight, or open loop at ``rate``
    tasks/s (Poisson arrivals). Several URLs (a cluster's gateways) share the
    connections in turn. Returns the summary with every record."""
    urls = [url] if isinstance(url, str) else url
    rng = random.Random(seed)
    records: dict[str, TaskRecord] = {}
    plan = []
    for _ in range(tasks):
        task, size = workload.sample(rng)
        records[task["taskUUID"]] = TaskRecord(task["taskUUID"], size, task["settings"]["steps"], 0.0)
        plan.append(task)
    conns = []
    for i in range(connections):
        target = urls[i % len(urls)]
        kind = RestConnection if target.startswith(("http://", "https://")) else Connection
        conns.append(kind(target, api_key, records))
    for c in conns:
        await c.__aenter__()
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            if rate:
                await _open_loop(conns, plan, records, rate, rng)
            else:
                await _closed_loop(conns, plan, records, concurrency or connections)
            await asyncio.sleep(0.2)  # catch duplicates that would arrive late
    finally:
        elapsed = time.perf_counter() - start
        for c in conns:
            await c.__aexit__()
    return summarize(records, elapsed, unknown=sum(c.unknown for c in conns), offered_rate=rate)


async def _closed_loop(conns, plan, records, concurrency: int) -> None:
    queue: asyncio.Queue = asyncio.Queue()
    for task in plan:
        queue.put_nowait(task)

    async def worker(i: int) -> None:
        conn = conns[i % len(conns)]
        while not queue.empty():
            task = queue.get_nowait()
            await conn.run(task, records[task["taskUUID"]])

    await asyncio.gather(*(worker(i) for i in range(concurrency)))


async def _open_loop(conns, plan, records, rate: float, rng: random.Random) -> None:
    running = []
    next_at = time.perf_counter()
    for i, task in enumerate(plan):
        next_at += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        running.append(asyncio.create_task(conns[i % len(conns)].run(task, records[task["taskUUID"]])))
    await asyncio.gather(*running)


def summarize(records: dict[str, TaskRecord], elapsed: float, *, unknown: int = 0, offered_rate=None) -> dict:
    done = [r for r in records.values() if r.done is not None]
    latencies = [r.done - r.sent for r in done if r.ok]
    ttfp = [r.first_progress - r.sent for r in done if r.first_progress]
    pct = lambda xs, q: round(float(np.percentile(xs, q)), 4) if xs else None  # noqa: E731
    return {
        "tasks": len(records),
        "succeeded": sum(1 for r in done if r.ok),
        "failed": sum(1 for r in done if not r.ok),
        "unanswered": len(records) - len(done),
        "answered_more_than_once": sum(1 for r in records.values() if r.terminal_count > 1),
        "unknown_task_uuids": unknown,
        "seconds": round(elapsed, 3),
        "offered_rate": offered_rate,
        "throughput": round(len(latencies) / elapsed, 3) if elapsed else 0.0,
        "p50_latency_s": pct(latencies, 50),
        "p99_latency_s": pct(latencies, 99),
        "p50_first_progress_s": pct(ttfp, 50),
        "errors": sorted({r.error for r in done if r.error}),
        "records": [asdict(r) for r in records.values()],
    }


def exactly_once(summary: dict) -> bool:
    return (
        summary["unanswered"] == 0
        and summary["answered_more_than_once"] == 0
        and summary["unknown_task_uuids"] == 0
    )


def print_row(label: str, s: dict) -> None:
    print(
        f"{label:28} {s['throughput']:9.2f} {s['p50_latency_s'] or 0:9.3f} {s['p99_latency_s'] or 0:9.3f} "
        f"{s['succeeded']:6d}/{s['tasks']:<6d} {'yes' if exactly_once(s) else 'NO':>5}"
    )


HEADER = f"{'run':28} {'tasks/s':>9} {'p50 s':>9} {'p99 s':>9} {'ok/total':>13} {'1x':>5}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="ws://127.0.0.1:8787/v1")
    parser.add_argument("--api-key", default="bench")
    parser.add_argument("--workload", default=str(ROOT / "benchmarks" / "workloads" / "tiny.json"))
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16, help="closed loop: tasks in flight")
    parser.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loadgen.json"))
    args = parser.parse_args()
    summary = asyncio.run(
        run_load(
            args.url,
            args.api_key,
            Workload.load(args.workload),
            tasks=args.tasks,
            connections=args.connections,
            concurrency=args.concurrency,
            rate=args.rate,
        )
    )
    print(HEADER)
    print_row("open loop" if args.rate else "closed loop", summary)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
