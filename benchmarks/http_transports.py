"""Which HTTP server carries REST: the prototype measurement behind the choice.

Three servers that do the least work a server can (parse the task array, answer one item
per task), driven by the same load generator (benchmarks/loadgen.py) in one run:

- ``websockets-ws``: the websockets server the gateway's WebSocket path runs on;
- ``aiohttp-ws``: aiohttp's WebSocket server, which option (b), one server carrying both
  transports, would move the WebSocket path onto;
- ``aiohttp-rest``: aiohttp answering sync ``POST /v1`` over HTTP/1.1 keep-alive, the
  REST path of either option.

    python benchmarks/http_transports.py            # ~1 minute
    python benchmarks/http_transports.py --smoke    # a few seconds

Each server runs in this process and the load generator in another (niced, as in
gateway_overhead.py); this process's CPU time per task is the server's. The servers are
measured in turns, ``--repeat`` times each, medians reported. WebSocket runs use
``--connections`` sockets with ``--concurrency`` tasks in flight; REST runs use
``--concurrency`` keep-alive connections (one request in flight on each), so both carry
the same number of tasks at once. Writes JSON to benchmarks/results/http_transports.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

import orjson
from aiohttp import WSMsgType, web
from websockets.asyncio.server import serve

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.gateway_overhead import _echo_handler, load, measure, median_run  # noqa: E402
from benchmarks.loadgen import HEADER, print_row  # noqa: E402

SERVERS = ("websockets-ws", "aiohttp-ws", "aiohttp-rest")


def _reply(task: dict) -> dict:
    if task.get("taskType") == "authentication":
        return {"taskType": "authentication", "connectionSessionUUID": "00000000-0000-0000-0000-000000000000"}
    return {"taskType": task.get("taskType"), "taskUUID": task.get("taskUUID"), "status": "success"}


async def _aiohttp_ws(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(max_msg_size=2**25, compress=False)
    await ws.prepare(request)
    async for message in ws:
        if message.type is WSMsgType.TEXT:
            for task in orjson.loads(message.data):
                await ws.send_frame(orjson.dumps({"data": [_reply(task)]}), WSMsgType.TEXT)
    return ws


async def _aiohttp_rest(request: web.Request) -> web.Response:
    tasks = orjson.loads(await request.read())
    body = orjson.dumps({"data": [_reply(task) for task in tasks]})
    return web.Response(body=body, content_type="application/json")


async def _aiohttp_site(handler) -> tuple[web.AppRunner, int]:
    app = web.Application(client_max_size=2**25)
    app.router.add_route("GET", "/v1", handler)
    app.router.add_route("POST", "/v1", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


async def main_async(args) -> dict:
    passes: dict[str, list[dict]] = {name: [] for name in SERVERS}
    ws_runner, ws_port = await _aiohttp_site(_aiohttp_ws)
    rest_runner, rest_port = await _aiohttp_site(_aiohttp_rest)
    try:
        async with serve(_echo_handler, "127.0.0.1", 0, compression=None, max_size=2**25) as echo:
            urls = {
                "websockets-ws": f"ws://127.0.0.1:{echo.sockets[0].getsockname()[1]}/v1",
                "aiohttp-ws": f"ws://127.0.0.1:{ws_port}/v1",
                "aiohttp-rest": f"http://127.0.0.1:{rest_port}/v1",
            }
            rest_args = argparse.Namespace(**{**vars(args), "connections": args.concurrency})
            run_args = {name: rest_args if name == "aiohttp-rest" else args for name in urls}
            for name, url in urls.items():
                await load(url, min(200, args.tasks), run_args[name])  # warm-up
            for _ in range(args.repeat):  # in turns, so that all see the same neighbours
                for name, url in urls.items():
                    passes[name].append(await measure(url, run_args[name]))
    finally:
        await ws_runner.cleanup()
        await rest_runner.cleanup()
    return {name: median_run(runs) for name, runs in passes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop offered rate, tasks/s")
    parser.add_argument("--connections", type=int, default=8, help="WebSocket connections")
    parser.add_argument("--concurrency", type=int, default=64, help="tasks in flight (REST: connections)")
    parser.add_argument("--repeat", type=int, default=3, help="passes per server; medians are reported")
    parser.add_argument("--loadgen-nice", type=int, default=10, help="niceness of the load generator")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "http_transports.json"))
    args = parser.parse_args()
    if args.smoke:
        args.tasks, args.rate, args.repeat = 300, 300.0, 1
    logging.basicConfig(level=logging.ERROR)
    results = asyncio.run(main_async(args))
    print(HEADER)
    for name in SERVERS:
        print_row(f"{name} saturated", results[name]["saturated"])
        print_row(f"{name} at {args.rate:g}/s", results[name]["paced"])
    base = results["websockets-ws"]["saturated"]["throughput"]
    ratios = {name: round(results[name]["saturated"]["throughput"] / base, 3) for name in SERVERS}
    cpu = {n: results[n]["saturated"]["server_cpu_us_per_task"] for n in SERVERS}
    print("throughput relative to websockets-ws: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print("server CPU per task: " + ", ".join(f"{k} {v:.0f} us" for k, v in cpu.items()))
    report = {
        "throughput_vs_websockets": ratios,
        "server_cpu_us_per_task": cpu,
        "p99_latency_s_at_rate": {n: results[n]["paced"]["p99_latency_s"] for n in SERVERS},
        "rate": args.rate,
        "repeat": args.repeat,
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
