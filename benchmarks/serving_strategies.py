"""Three ways to serve the same model, compared in one run on the same workload:

  (a) continuous — this gateway: step-level continuous batching;
  (b) static     — what generic servers do (Triton's dynamic batcher, Ray Serve's
                   @serve.batch): wait up to a delay for same-size requests, run
                   that batch to completion and return its results together, as a
                   batched call does (the engine's --batching static, sharing all
                   other code);
  (c) stock      — one request at a time through diffusers' stock pipeline (what
                   ComfyUI- and A1111-style queues do), behind the same server.

Each strategy is driven over real WebSockets by the load generator: after a warm-up
(``--warmup`` tasks, not measured: first calls at each shape are slow), closed loop for
its saturated throughput, then open loop (Poisson arrivals) at 25/50/75/95 % of (a)'s
measured capacity. Prints a table, writes JSON and a PNG plot of throughput against
p50/p99 latency.

    python benchmarks/serving_strategies.py --model tiny
    python benchmarks/serving_strategies.py --model small --tasks 48
    python benchmarks/serving_strategies.py --smoke          # seconds; CI runs this
    # GPU: --model full-random --workload benchmarks/workloads/gpu-512.json --dtype bf16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import HEADER, Workload, exactly_once, print_row, run_load  # noqa: E402
from benchmarks.stock_engine import StockPipelineClient  # noqa: E402
from engine.client import InprocEngineClient  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from gateway.config import GatewayConfig  # noqa: E402
from gateway.server import GatewayServer  # noqa: E402

STRATEGIES = ("continuous", "static", "stock")
LOADS = (0.25, 0.5, 0.75, 0.95)


def engine_for(strategy: str, config: EngineConfig):
    if strategy == "stock":  # torch's own default: every core
        return StockPipelineClient(replace(config, torch_threads=os.cpu_count() or 1))
    return InprocEngineClient(replace(config, mode=strategy))


async def run_strategy(
    strategy: str, config: EngineConfig, workload: Workload, args, rates: list[float] | None
):
    gateway_config = GatewayConfig(
        port=0,
        max_in_flight_per_connection=100_000,
        max_in_flight_per_key=100_000,
        max_steps=1000,
        engine=config,
    )
    async with GatewayServer(gateway_config, engine_for(strategy, config)) as server:
        load = dict(connections=args.connections, timeout=args.timeout)
        if args.warmup:  # first calls at each shape and batch size are slow; not measured
            await run_load(
                server.url, "bench", workload, tasks=args.warmup, concurrency=args.concurrency, seed=0, **load
            )
        saturated = await run_load(
            server.url, "bench", workload, tasks=args.tasks, concurrency=args.concurrency, seed=1, **load
        )
        paced = []
        for rate in rates or []:
            paced.append(
                await run_load(server.url, "bench", workload, tasks=args.tasks, rate=rate, seed=2, **load)
            )
    return {"saturated": saturated, "paced": paced}


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for strategy, result in results.items():
        points = sorted(result["paced"], key=lambda s: s["throughput"])
        xs = [p["throughput"] for p in points]
        for ax, key in zip(axes, ("p50_latency_s", "p99_latency_s"), strict=True):
            (line,) = ax.plot(xs, [p[key] for p in points], marker="o", label=strategy)
            ax.axvline(result["saturated"]["throughput"], color=line.get_color(), linestyle=":", alpha=0.6)
    seconds = FuncFormatter(lambda value, _: f"{value:g}")
    for ax, name in zip(axes, ("p50", "p99"), strict=True):
        ax.set_xlabel("achieved throughput (tasks/s); dotted: saturated")
        ax.set_ylabel(f"{name} latency (s)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(seconds)
        ax.yaxis.set_minor_locator(LogLocator(subs=(2, 3, 5)))
        ax.yaxis.set_minor_formatter(seconds)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def strip(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "records"}


async def main_async(args) -> dict:
    config = EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        max_batch_rows=args.max_batch_rows,
        max_queue=100_000,
        static_batch_delay=args.static_delay,
        group_policy=args.group_policy,
        max_steps=1000,
    )
    workload = Workload.load(args.workload)
    results: dict[str, dict] = {}
    first = await run_strategy("continuous", config, workload, args, None)
    capacity = first["saturated"]["throughput"]
    rates = [round(capacity * f, 3) for f in args.loads]
    print(f"(a) continuous capacity: {capacity:.2f} tasks/s → offered rates {rates}", flush=True)
    for strategy in args.strategies:
        results[strategy] = await run_strategy(strategy, config, workload, args, rates)
        print(HEADER)
        print_row(f"{strategy} saturated", results[strategy]["saturated"])
        for fraction, summary in zip(args.loads, results[strategy]["paced"], strict=True):
            print_row(f"{strategy} at {fraction:.0%}", summary)
    return {"capacity": capacity, "rates": rates, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--workload", help="default: benchmarks/workloads/<model>.json")
    parser.add_argument("--tasks", type=int, default=60, help="tasks per measurement")
    parser.add_argument(
        "--warmup", type=int, default=32, help="tasks each server runs, unmeasured, before measuring"
    )
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=32, help="closed loop: tasks in flight")
    parser.add_argument("--max-batch-rows", type=int, default=16)
    parser.add_argument("--static-delay", type=float, default=0.05, help="static batching: seconds to wait")
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--smoke", action="store_true", help="tiny model, few tasks, two loads")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving_strategies.json"))
    parser.add_argument(
        "--strategies", default=",".join(STRATEGIES), help="comma list of " + ", ".join(STRATEGIES)
    )
    parser.add_argument(
        "--loads", default=",".join(map(str, LOADS)), help="comma list of fractions of (a)'s capacity"
    )
    parser.add_argument(
        "--group-policy", default=EngineConfig.group_policy, help="the engine's shape-group policy"
    )
    args = parser.parse_args()
    args.strategies = tuple(s for s in args.strategies.split(",") if s)
    args.loads = tuple(float(x) for x in args.loads.split(",") if x)
    if args.smoke:
        args.model, args.tasks, args.loads, args.concurrency, args.warmup = "tiny", 5, (0.5, 0.95), 5, 2
        args.workload = args.workload or str(ROOT / "benchmarks" / "workloads" / "smoke.json")
    args.workload = args.workload or str(ROOT / "benchmarks" / "workloads" / f"{args.model}.json")
    logging.basicConfig(level=logging.ERROR)
    report = asyncio.run(main_async(args))
    results = report["results"]
    sat = {s: results[s]["saturated"]["throughput"] for s in args.strategies}
    at75 = (
        {s: results[s]["paced"][args.loads.index(0.75)]["p99_latency_s"] for s in args.strategies}
        if 0.75 in args.loads
        else {}
    )
    ratios = {}
    if {"continuous", "stock"} <= sat.keys():
        ratios["a_over_c_throughput"] = round(sat["continuous"] / sat["stock"], 3)
    if {"continuous", "static"} <= sat.keys():
        ratios["a_over_b_throughput"] = round(sat["continuous"] / sat["static"], 3)
        if at75:
            ratios["a_over_b_p99_at_75pct"] = round(at75["continuous"] / at75["static"], 3)
    print("ratios:", json.dumps(ratios))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "machine": platform.platform(),
        "model": args.model,
        "workload": Path(args.workload).name,
        "tasks_per_measurement": args.tasks,
        "capacity_a": report["capacity"],
        "offered_rates": report["rates"],
        "ratios": ratios,
        "all_exactly_once": all(
            exactly_once(r["saturated"]) and all(exactly_once(p) for p in r["paced"])
            for r in results.values()
        ),
        "results": {
            s: {"saturated": strip(r["saturated"]), "paced": [strip(p) for p in r["paced"]]}
            for s, r in results.items()
        },
    }
    out.write_text(json.dumps(summary, indent=2))
    png = out.with_suffix(".png")
    plot(results, png, f"{args.model} model, {Path(args.workload).stem} workload — {platform.machine()}")
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
