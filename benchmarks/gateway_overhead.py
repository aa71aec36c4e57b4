"""Gateway overhead: the gateway with an engine that answers at once (the null engine)
against a bare websockets server that answers the same frames with the least work a
server can do (parse the array, reply one item per task), in one run.

    python benchmarks/gateway_overhead.py            # ~1 minute
    python benchmarks/gateway_overhead.py --smoke    # a few seconds

The load generator runs in a process of its own. Reports, for each server: saturated throughput (closed loop) and p50/p99 latency at a
fixed offered rate (open loop, default 1,000 tasks/s), and the ratios. Writes JSON to
benchmarks/results/gateway_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
from pathlib import Path

import orjson
from websockets.asyncio.server import serve

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import HEADER, exactly_once, print_row  # noqa: E402
from engine.client import NullEngineClient  # noqa: E402
from gateway.config import GatewayConfig  # noqa: E402
from gateway.server import GatewayServer  # noqa: E402

WORKLOAD = ROOT / "benchmarks" / "workloads" / "overhead.json"


async def _echo_handler(ws) -> None:
    async for message in ws:
        tasks = orjson.loads(message)
        for task in tasks:
            if task.get("taskType") == "authentication":
                reply = {
                    "taskType": "authentication",
                    "connectionSessionUUID": "00000000-0000-0000-0000-000000000000",
                }
            else:
                reply = {
                    "taskType": task.get("taskType"),
                    "taskUUID": task.get("taskUUID"),
                    "status": "success",
                }
            await ws.send(orjson.dumps({"data": [reply]}), text=True)


async def load(url: str, tasks: int, args, **mode) -> dict:
    """Run the load generator in its own process, so the server keeps a core to itself."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [
            sys.executable,
            str(ROOT / "benchmarks" / "loadgen.py"),
            "--url",
            url,
            "--workload",
            str(WORKLOAD),
            "--tasks",
            str(tasks),
            "--connections",
            str(args.connections),
            "--out",
            out.name,
        ]
        command += (
            ["--rate", str(mode["rate"])] if "rate" in mode else ["--concurrency", str(args.concurrency)]
        )
        process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.DEVNULL)
        if await process.wait() != 0:
            raise RuntimeError(f"the load generator failed: {command}")
        return json.loads(Path(out.name).read_text())


async def measure(url: str, args) -> dict:
    await load(url, min(200, args.tasks), args)  # warm-up
    return {
        "saturated": await load(url, args.tasks, args),
        "paced": await load(url, args.tasks, args, rate=args.rate),
    }


async def main_async(args) -> dict:
    results = {}
    async with serve(_echo_handler, "127.0.0.1", 0, compression=None, max_size=2**25) as echo:
        port = echo.sockets[0].getsockname()[1]
        results["echo"] = await measure(f"ws://127.0.0.1:{port}/v1", args)
    config = GatewayConfig(port=0, max_in_flight_per_connection=10_000, max_in_flight_per_key=100_000)
    async with GatewayServer(config, NullEngineClient()) as server:
        results["gateway"] = await measure(server.url, args)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop offered rate, tasks/s")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gateway_overhead.json"))
    args = parser.parse_args()
    if args.smoke:
        args.tasks, args.rate = 300, 300.0
    logging.basicConfig(level=logging.ERROR)
    results = asyncio.run(main_async(args))
    print(HEADER)
    for name in ("echo", "gateway"):
        print_row(f"{name} saturated", results[name]["saturated"])
        print_row(f"{name} at {args.rate:g}/s", results[name]["paced"])
    echo, gw = results["echo"], results["gateway"]
    ratio = gw["saturated"]["throughput"] / echo["saturated"]["throughput"]
    added_p99_ms = 1000 * (gw["paced"]["p99_latency_s"] - echo["paced"]["p99_latency_s"])
    print(
        f"throughput ratio gateway/echo: {ratio:.2f}x   added p99 at {args.rate:g}/s: {added_p99_ms:.2f} ms"
    )
    report = {
        "throughput_ratio": round(ratio, 3),
        "added_p99_ms": round(added_p99_ms, 3),
        "rate": args.rate,
        "all_exactly_once": all(exactly_once(r[k]) for r in results.values() for k in r),
        "runs": {
            n: {k: {x: y for x, y in v.items() if x != "records"} for k, v in r.items()}
            for n, r in results.items()
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
