"""Gateway overhead: the gateway with an engine that answers at once (the null engine)
against a bare websockets server that answers the same frames with the least work a
server can do (parse the array, reply one item per task), in one run; and the same
gateway's REST transport (sync ``POST /v1``, one task per request, HTTP/1.1 keep-alive);
and the gateway with its metrics turned off (``--no-metrics``), to price them.

    python benchmarks/gateway_overhead.py            # ~1 minute
    python benchmarks/gateway_overhead.py --smoke    # a few seconds

The load generator runs in a process of its own, at a lower scheduling priority
(``--loadgen-nice``, default 10): on a shared machine it would otherwise hold the core
the server wakes up on for a whole scheduler slice (a few ms), which shows up in the
server's tail latency, the more so the more CPU the server uses per task; in real use
the clients are on other machines. Both servers are measured the same way.

Reports, for each server: saturated throughput (closed loop), p50/p99 latency at a fixed
offered rate (open loop, default 1,000 tasks/s), the server's own CPU time per task, and
the ratios: gateway/echo over WebSocket, gateway REST/gateway WebSocket, and gateway
with metrics/without (the metrics' cost; the target is at most 5 % of throughput). WebSocket
runs use ``--connections`` sockets carrying ``--concurrency`` tasks; REST runs use
``--concurrency`` keep-alive connections, one request in flight on each, so both carry
the same number of tasks at once. The servers are measured in turns, ``--repeat`` times each, and the
medians are reported: on a shared machine a single pass mostly measures the neighbours.
Writes JSON to benchmarks/results/gateway_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
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
        if args.loadgen_nice:
            command = ["nice", "-n", str(args.loadgen_nice), *command]
        process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.DEVNULL)
        if await process.wait() != 0:
            raise RuntimeError(f"the load generator failed: {command}")
        return json.loads(Path(out.name).read_text())


async def measure(url: str, args) -> dict:
    """One pass: saturated, then paced. The server runs in this process and the load
    generator in another, so this process's CPU time is the server's."""
    cpu = time.process_time()
    saturated = await load(url, args.tasks, args)
    saturated["server_cpu_us_per_task"] = round(1e6 * (time.process_time() - cpu) / args.tasks, 1)
    return {"saturated": saturated, "paced": await load(url, args.tasks, args, rate=args.rate)}


def median_run(passes: list[dict]) -> dict:
    """Per mode, the pass with the median throughput (saturated) or p99 (paced), plus
    the median of each figure across passes."""
    out = {}
    for mode, key in (("saturated", "throughput"), ("paced", "p99_latency_s")):
        runs = sorted((p[mode] for p in passes), key=lambda r: r[key])
        chosen = dict(runs[len(runs) // 2])
        for figure in ("throughput", "p50_latency_s", "p99_latency_s", "server_cpu_us_per_task"):
            values = [r[figure] for r in runs if r.get(figure) is not None]
            if values:
                chosen[figure] = round(statistics.median(values), 5)
        chosen["exactly_once_all_passes"] = all(exactly_once(r) for r in runs)
        chosen["passes"] = [
            {k: r.get(k) for k in ("throughput", "p50_latency_s", "p99_latency_s")} for r in runs
        ]
        out[mode] = chosen
    return out


SERVERS = ("echo", "gateway", "gateway-rest", "gateway-no-metrics")


async def main_async(args) -> dict:
    passes: dict[str, list[dict]] = {name: [] for name in SERVERS}
    config = GatewayConfig(
        port=0, http_port=0, max_in_flight_per_connection=10_000, max_in_flight_per_key=100_000
    )
    unmeasured = GatewayConfig(**{**vars(config), "http_port": None, "metrics": False})
    async with (
        serve(_echo_handler, "127.0.0.1", 0, compression=None, max_size=2**25) as echo,
        GatewayServer(config, NullEngineClient()) as server,
        GatewayServer(unmeasured, NullEngineClient()) as no_metrics,
    ):
        urls = {
            "echo": f"ws://127.0.0.1:{echo.sockets[0].getsockname()[1]}/v1",
            "gateway": server.url,
            "gateway-rest": server.http_url,
            "gateway-no-metrics": no_metrics.url,
        }
        # REST: one request in flight per connection, as many connections as tasks in flight.
        rest_args = argparse.Namespace(**{**vars(args), "connections": args.concurrency})
        run_args = {name: rest_args if name == "gateway-rest" else args for name in urls}
        for name, url in urls.items():
            await load(url, min(200, args.tasks), run_args[name])  # warm-up
        for _ in range(args.repeat):  # in turns, so that all see the same neighbours
            for name, url in urls.items():
                passes[name].append(await measure(url, run_args[name]))
    return {name: median_run(runs) for name, runs in passes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop offered rate, tasks/s")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="passes per server; medians are reported")
    parser.add_argument(
        "--loadgen-nice",
        type=int,
        default=10,
        help="niceness of the load generator process (0: the same priority as the servers)",
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gateway_overhead.json"))
    args = parser.parse_args()
    if args.smoke:
        args.tasks, args.rate, args.repeat = 300, 300.0, 1
    logging.basicConfig(level=logging.ERROR)
    results = asyncio.run(main_async(args))
    print(HEADER)
    for name in SERVERS:
        print_row(f"{name} saturated", results[name]["saturated"])
        print_row(f"{name} at {args.rate:g}/s", results[name]["paced"])
    echo, gw, rest = results["echo"], results["gateway"], results["gateway-rest"]
    bare = results["gateway-no-metrics"]
    ratio = gw["saturated"]["throughput"] / echo["saturated"]["throughput"]
    rest_ratio = rest["saturated"]["throughput"] / gw["saturated"]["throughput"]
    metrics_ratio = gw["saturated"]["throughput"] / bare["saturated"]["throughput"]
    added_p99_ms = 1000 * (gw["paced"]["p99_latency_s"] - echo["paced"]["p99_latency_s"])
    cpu = {name: results[name]["saturated"]["server_cpu_us_per_task"] for name in SERVERS}
    print(
        f"throughput ratio gateway/echo: {ratio:.2f}x   added p99 at {args.rate:g}/s: {added_p99_ms:.2f} ms   "
        f"server CPU per task: echo {cpu['echo']:.0f} us, gateway {cpu['gateway']:.0f} us "
        f"(medians of {args.repeat} passes each)"
    )
    print(
        f"throughput ratio gateway REST/WebSocket: {rest_ratio:.2f}x   REST p99 at {args.rate:g}/s: "
        f"{1000 * rest['paced']['p99_latency_s']:.2f} ms   server CPU per REST task: {cpu['gateway-rest']:.0f} us"
    )
    print(
        f"metrics: throughput with/without {metrics_ratio:.3f}x ({100 * (1 - metrics_ratio):+.1f} % cost)   "
        f"server CPU per task {cpu['gateway']:.0f} us with, {cpu['gateway-no-metrics']:.0f} us without"
    )
    report = {
        "throughput_ratio": round(ratio, 3),
        "rest_throughput_ratio": round(rest_ratio, 3),
        "metrics_throughput_ratio": round(metrics_ratio, 4),
        "added_p99_ms": round(added_p99_ms, 3),
        "server_cpu_us_per_task": cpu,
        "rate": args.rate,
        "repeat": args.repeat,
        "loadgen_nice": args.loadgen_nice,
        "all_exactly_once": all(r[k]["exactly_once_all_passes"] for r in results.values() for k in r),
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
