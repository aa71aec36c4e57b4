"""Soak: a bounded run on loopback with the real engine (tiny model by default).

    python benchmarks/soak.py                      # ~60 s, 20 connections, ~2,000 tasks
    python benchmarks/soak.py --duration 8 --connections 5  # the CI-sized version

Each connection sends tasks one after another, mixing sizes and output types, and now
and then drops its socket right after sending, then re-authenticates with its
``connectionSessionUUID``. Results come back on the socket, from the session's replay
after a resume, or — for a frame the server wrote just as the client hung up — from a
``getResponse`` poll, which is what a client does for a task it has no answer for.
Checks that every ``taskUUID`` got exactly one terminal answer and that the server's
memory (RSS) stays flat after warm-up. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import _data_uri  # noqa: E402
from engine.client import InprocEngineClient  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from gateway.config import GatewayConfig  # noqa: E402
from gateway.server import GatewayServer  # noqa: E402

SIZES = [(64, 64), (96, 64), (40, 24)]
OUTPUTS = ["URL", "base64Data", "dataURI"]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Tally:
    """Pushes (on the socket, or replayed after a resume) per task must be exactly one,
    except for a frame lost as the client hung up: such a task is then queried with
    getResponse, which answers without pushing anything twice."""

    def __init__(self) -> None:
        self.sent: set[str] = set()
        self.pushes: Counter = Counter()
        self.queried: set[str] = set()
        self.drops = 0

    def take(self, frame: dict) -> set[str]:
        answered = set()
        for item in frame.get("data", []) + frame.get("errors", []):
            task_uuid = item.get("taskUUID")
            if task_uuid in self.sent and item.get("status") != "processing":
                self.pushes[task_uuid] += 1
                answered.add(task_uuid)
        return answered


async def authenticate(ws, key: str, session: str | None) -> str:
    auth = {"taskType": "authentication", "apiKey": key}
    if session:
        auth["connectionSessionUUID"] = session
    await ws.send(orjson.dumps([auth]).decode())
    return orjson.loads(await ws.recv())["data"][0]["connectionSessionUUID"]


async def worker(
    url: str, images: dict, tally: Tally, end: float, drop_rate: float, rng: random.Random
) -> None:
    session = None
    key = f"soak-{rng.randrange(4)}"
    waiting: set[str] = set()
    while time.monotonic() < end:
        async with connect(url, max_size=2**26) as ws:
            session = await authenticate(ws, key, session)
            try:
                while time.monotonic() < end:
                    w, h = rng.choice(SIZES)
                    task = {
                        "taskType": "imageUpscale",
                        "taskUUID": str(uuid.uuid4()),
                        "model": "runware:502@1",
                        "inputImage": images[(w, h)],
                        "outputType": rng.choice(OUTPUTS),
                        "outputFormat": rng.choice(["JPG", "PNG", "WEBP"]),
                        "settings": {"steps": rng.randint(1, 3), "CFGScale": rng.choice([0.0, 1.0, 7.5])},
                    }
                    tally.sent.add(task["taskUUID"])
                    waiting.add(task["taskUUID"])
                    await ws.send(orjson.dumps([task]).decode())
                    if rng.random() < drop_rate:
                        tally.drops += 1
                        break  # hang up mid-task; resume on the next connection
                    while task["taskUUID"] in waiting:
                        waiting -= tally.take(orjson.loads(await asyncio.wait_for(ws.recv(), 120)))
            except ConnectionClosed:
                pass
    # Drain: resume once more and take what the session kept, until it goes quiet.
    async with connect(url, max_size=2**26) as ws:
        await authenticate(ws, key, session)
        while True:
            try:
                waiting -= tally.take(orjson.loads(await asyncio.wait_for(ws.recv(), 2.0)))
            except TimeoutError:
                break
    if waiting:
        async with connect(url, max_size=2**26) as ws:
            await authenticate(ws, key, None)  # a fresh session: nothing is pushed here
            for task_uuid in waiting:
                await ws.send(orjson.dumps([{"taskType": "getResponse", "taskUUID": task_uuid}]).decode())
                frame = orjson.loads(await ws.recv())
                item = (frame.get("data") or frame.get("errors"))[0]
                if item.get("status") != "processing" and item.get("code") != "invalidTaskUUID":
                    tally.queried.add(task_uuid)


async def main_async(args) -> dict:
    config = GatewayConfig(
        port=0,
        max_in_flight_per_key=10_000,
        output_ttl=args.retention,
        record_ttl=args.retention,
        engine=EngineConfig(model=args.model, device=args.device, dtype=args.dtype, max_batch_rows=32),
    )
    images = {size: _data_uri(*size, i) for i, size in enumerate(SIZES)}
    async with GatewayServer(config, InprocEngineClient(config.engine)) as server:
        rng = random.Random(args.seed)
        warm = Tally()
        await asyncio.gather(
            *(
                worker(
                    server.url,
                    images,
                    warm,
                    time.monotonic() + args.warmup,
                    0.0,
                    random.Random(rng.random()),
                )
                for _ in range(args.connections)
            )
        )
        rss_start = rss_mib()
        tally = Tally()
        started = time.monotonic()
        end = started + args.duration
        await asyncio.gather(
            *(
                worker(server.url, images, tally, end, args.drop_rate, random.Random(rng.random()))
                for _ in range(args.connections)
            )
        )
        elapsed = time.monotonic() - started
        rss_end = rss_mib()
    missing = [u for u in tally.sent if tally.pushes[u] == 0 and u not in tally.queried]
    doubled = [u for u in tally.sent if tally.pushes[u] > 1]
    return {
        "connections": args.connections,
        "seconds": round(elapsed, 1),
        "tasks": len(tally.sent),
        "tasks_per_s": round(len(tally.sent) / elapsed, 2),
        "drops_and_resumes": tally.drops,
        "pushed": sum(1 for u in tally.sent if tally.pushes[u] == 1),
        "lost_at_hang_up_then_queried": len(tally.queried),
        "unanswered": len(missing),
        "answered_more_than_once": len(doubled),
        "retention_s": args.retention,
        "rss_after_warmup_mib": round(rss_start, 1),
        "rss_end_mib": round(rss_end, 1),
        "rss_growth_pct": round(100 * (rss_end - rss_start) / rss_start, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--drop-rate", type=float, default=0.03, help="chance to hang up right after a send")
    parser.add_argument("--warmup", type=float, default=15, help="seconds of load before RSS is first read")
    parser.add_argument(
        "--retention",
        type=float,
        default=10,
        help="output and record TTL, s: short, so memory reaches steady state",
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    report = asyncio.run(main_async(args))
    for key, value in report.items():
        print(f"{key:28} {value}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    ok = (
        report["unanswered"] == 0 and report["answered_more_than_once"] == 0 and report["rss_growth_pct"] < 10
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
