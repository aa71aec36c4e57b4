"""Cluster scaling on one machine, with a SIMULATED model (UNet calls sleep).

    python benchmarks/cluster_scaling.py                    # 1, 2, 4, 8 workers; latency; chaos
    python benchmarks/cluster_scaling.py --smoke            # seconds, for CI

A 2-core machine cannot show a real model scaling across GPUs, so every worker runs
``--model sim:FIXED_MS,PER_ROW_MS``: the real engine (scheduler, threads, codecs) and
the real cluster (Redis, gateways, workers as processes), with UNet calls that sleep
for the modelled time. The CPUs are then not the limit (their use is reported), and
what is measured is the cluster itself. In one run, side by side:

1. **Scaling**: throughput with 1, 2, 4, 8 workers behind 2 gateways (closed loop,
   enough tasks in flight to fill every worker's batches); the ratio to M × one worker.
2. **Added latency**: one task at a time, p50 through ``serve`` (the same simulated
   engine in one process) against a gateway and a worker on Redis.
3. **Chaos**: 4 workers under steady open-loop load; every 10 s one is ``kill -9``-ed
   and a new one started; lost and doubled tasks counted, p99 against a calm run.

Prints a table, writes JSON (and a PNG of throughput against workers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import Workload, exactly_once, run_load  # noqa: E402
from tests.cluster_harness import Cluster, RedisProcess, Role  # noqa: E402

WORKLOAD = ROOT / "benchmarks" / "workloads" / "cluster.json"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / CLOCK_TICKS


def cluster_cpu_seconds(cluster: Cluster) -> float:
    """CPU time of this process, Redis and every role ever started (a killed one's is
    counted once reaped, through this process's children times)."""
    pids = [os.getpid(), cluster.redis.proc.pid, *(r.proc.pid for r in cluster.roles)]
    children = os.times()
    return cpu_seconds(pids) + children.children_user + children.children_system


async def measured(cluster: Cluster, load) -> dict:
    """Run ``load`` and add the CPU use of every process of the run to its summary."""
    before, started = cluster_cpu_seconds(cluster), time.monotonic()
    summary = await load
    wall = time.monotonic() - started
    used = cluster_cpu_seconds(cluster) - before
    summary["cpu_percent_of_machine"] = round(100 * used / (wall * os.cpu_count()), 1)
    summary.pop("records", None)
    return summary


def worker_flags(args) -> list[str]:
    return ["--max-batch-rows", str(args.rows), "--log-level", "WARNING"]


async def scaling(args, redis: RedisProcess, log_dir: Path) -> list[dict]:
    """Throughput with each worker count, on one cluster that grows (workers are added,
    the gateways stay), each count measured after a warm-up of its own."""
    rows = []
    redis.flush()
    cluster = Cluster(redis, log_dir, common=["--claim-timeout", str(args.claim_timeout)])
    try:
        gateways = [cluster.gateway(f"g{i}", "--log-level", "WARNING") for i in range(2)]
        urls = [g.url for g in gateways]
        workers: list[Role] = []
        workload = Workload.load(WORKLOAD)
        for count in args.workers:
            while len(workers) < count:
                workers.append(cluster.worker(f"w{len(workers)}", *worker_flags(args), model=args.model))
            await cluster.ready(*gateways, *workers, timeout=180)
            in_flight = 2 * args.rows * count  # enough to keep every worker's next call full
            load = {"connections": 2 * count, "concurrency": in_flight}
            await run_load(urls, "bench", workload, tasks=in_flight, **load)
            measuring = run_load(urls, "bench", workload, tasks=args.tasks_per_worker * count, seed=count, **load)
            summary = await measured(cluster, measuring)
            summary["workers"] = count
            rows.append(summary)
            print(
                f"{count:>3} workers  {summary['throughput']:8.2f} tasks/s   p50 {summary['p50_latency_s']:.3f} s"
                f"   CPU {summary['cpu_percent_of_machine']:5.1f} %   exactly once: {exactly_once(summary)}"
            )
    finally:
        cluster.close()
    one = rows[0]["throughput"] / rows[0]["workers"]
    for row in rows:
        row["scaling_vs_ideal"] = round(row["throughput"] / (one * row["workers"]), 3)
    return rows


async def latency(args, redis: RedisProcess, log_dir: Path) -> dict:
    """p50 of one task at a time: serve against the cluster, same simulated engine. Both
    run at once and take turns, task by task, so drift on a shared machine hits both."""
    workload = Workload.load(WORKLOAD)
    redis.flush()
    cluster = Cluster(redis, log_dir, common=["--claim-timeout", str(args.claim_timeout)])
    serve = Role("serve", "serve", ["--model", args.latency_model, *worker_flags(args)], log_dir)
    try:
        gateway = cluster.gateway("lat", "--log-level", "WARNING")
        worker = cluster.worker("lat", *worker_flags(args), model=args.latency_model)
        await cluster.ready(gateway, worker, serve, timeout=120)
        runs: dict[str, list[dict]] = {"serve": [], "cluster": []}
        for n in range(args.latency_tasks // 5 + 2):  # the first two rounds warm up
            for name, url in (("serve", serve.url), ("cluster", gateway.url)):
                summary = await run_load(url, "bench", workload, tasks=5, connections=1, concurrency=1, seed=n)
                if n >= 2:
                    runs[name].append(summary)
    finally:
        serve.stop()
        cluster.close()
    p50 = {name: 1000 * statistics.median(r["latency_s"] for s in found for r in _ok(s)) for name, found in runs.items()}
    added_ms = p50["cluster"] - p50["serve"]
    print(
        f"p50, one task at a time: serve {p50['serve']:.1f} ms, cluster {p50['cluster']:.1f} ms: "
        f"added {added_ms:+.1f} ms (target ≤ +3 ms)"
    )
    return {
        "model": args.latency_model,
        "tasks_each": sum(len(_ok(s)) for s in runs["serve"]),
        "serve_p50_ms": round(p50["serve"], 2),
        "cluster_p50_ms": round(p50["cluster"], 2),
        "added_p50_ms": round(added_ms, 2),
        "exactly_once": all(exactly_once(s) for found in runs.values() for s in found),
    }


def _ok(summary: dict) -> list[dict]:
    """The succeeded tasks of a run, each with its latency."""
    return [{**r, "latency_s": r["done"] - r["sent"]} for r in summary["records"] if r["ok"]]


async def chaos(args, redis: RedisProcess, log_dir: Path, capacity: float) -> dict:
    """``chaos_workers`` (4) workers at steady load: first calm, then with one killed
    and replaced every ``kill_every`` seconds; the same cluster, the same offered load."""
    rate = args.chaos_load * capacity
    redis.flush()
    cluster = Cluster(redis, log_dir, common=["--claim-timeout", str(args.claim_timeout)])
    runs = {}
    try:
        gateways = [cluster.gateway(f"chaos-g{i}", "--log-level", "WARNING") for i in range(2)]
        workers = [
            cluster.worker(f"chaos-w{i}", *worker_flags(args), model=args.model) for i in range(args.chaos_workers)
        ]
        await cluster.ready(*gateways, *workers, timeout=180)
        urls = [g.url for g in gateways]
        for name in ("calm", "chaos"):
            load = run_load(
                urls, "bench", Workload.load(WORKLOAD), tasks=int(rate * args.chaos_seconds), connections=8, rate=rate
            )
            kills: list[str] = []
            if name == "chaos":
                summary, _ = await asyncio.gather(
                    measured(cluster, load), kill_and_replace(args, cluster, workers, kills)
                )
            else:
                summary = await measured(cluster, load)
            summary["killed"] = kills
            runs[name] = summary
            print(
                f"{name:>5}: {summary['succeeded']}/{summary['tasks']} ok, {summary['unanswered']} lost, "
                f"{summary['answered_more_than_once']} doubled, p99 {summary['p99_latency_s']:.2f} s, "
                f"{len(kills)} workers killed"
            )
    finally:
        cluster.close()
    bound = runs["calm"]["p99_latency_s"] + args.claim_timeout
    runs["p99_bound_s"] = round(bound, 3)
    runs["p99_within_bound"] = runs["chaos"]["p99_latency_s"] < bound
    return runs


async def kill_and_replace(args, cluster: Cluster, workers: list[Role], kills: list[str]) -> None:
    """Every ``kill_every`` seconds, ``kill -9`` a live worker and start a new one."""
    rng = random.Random(7)
    for n in range(int(args.chaos_seconds // args.kill_every)):
        await asyncio.sleep(args.kill_every)
        victim = rng.choice([w for w in workers if w.proc.poll() is None])
        victim.signal(signal.SIGKILL)
        kills.append(victim.name)
        workers.append(cluster.worker(f"chaos-r{n}", *worker_flags(args), model=args.model))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [r["workers"] for r in rows]
    one = rows[0]["throughput"] / rows[0]["workers"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(counts, [one * c for c in counts], "--", color="grey", label="M × one worker")
    ax.plot(counts, [r["throughput"] for r in rows], "o-", label="measured, 2 gateways")
    ax.set_xlabel("workers (simulated model)")
    ax.set_ylabel("tasks / s")
    ax.set_xticks(counts)
    ax.set_title("Cluster throughput against workers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main_async(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        redis = RedisProcess(log_dir).start()
        try:
            rows = await scaling(args, redis, log_dir)
            lat = await latency(args, redis, log_dir)
            per_worker = next((r for r in rows if r["workers"] == args.chaos_workers), rows[-1])
            capacity = per_worker["throughput"] / per_worker["workers"] * args.chaos_workers
            storm = await chaos(args, redis, log_dir, capacity) if args.chaos_seconds else None
        finally:
            redis.stop()
    return {
        "note": "SIMULATED model: UNet calls sleep for the modelled time; outputs are resized inputs",
        "model": args.model,
        "rows_per_call": args.rows,
        "claim_timeout_s": args.claim_timeout,
        "machine_cpus": os.cpu_count(),
        "scaling": rows,
        "latency": lat,
        "chaos": storm,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sim:100,2", help="the simulated cost: sim:FIXED_MS,PER_ROW_MS")
    parser.add_argument("--latency-model", default="sim:5,0", help="the simulated cost for the latency run")
    parser.add_argument("--rows", type=int, default=8, help="--max-batch-rows of every worker")
    parser.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--tasks-per-worker", type=int, default=64)
    parser.add_argument("--latency-tasks", type=int, default=60)
    parser.add_argument("--chaos-seconds", type=float, default=60.0, help="0: no chaos run")
    parser.add_argument("--kill-every", type=float, default=10.0)
    parser.add_argument("--chaos-workers", type=int, default=4)
    parser.add_argument("--chaos-load", type=float, default=0.6, help="offered load, × the 4-worker capacity")
    parser.add_argument("--claim-timeout", type=float, default=5.0)
    parser.add_argument("--smoke", action="store_true", help="a few seconds: 1 and 2 workers, a short chaos run")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cluster_scaling.json"))
    args = parser.parse_args()
    if args.smoke:
        args.workers, args.tasks_per_worker, args.latency_tasks = [1, 2], 8, 5
        args.chaos_seconds, args.kill_every, args.claim_timeout, args.chaos_workers = 6.0, 3.0, 2.0, 2
    report = asyncio.run(main_async(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report["scaling"], out.with_suffix(".png"))
    print(f"\n{'workers':>8} {'tasks/s':>9} {'× ideal':>8} {'CPU %':>7}")
    for row in report["scaling"]:
        print(f"{row['workers']:>8} {row['throughput']:>9.2f} {row['scaling_vs_ideal']:>8.3f} {row['cpu_percent_of_machine']:>7.1f}")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
