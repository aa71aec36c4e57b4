"""The engine's real scheduler on a simulated clock: compare batching strategies and
group policies in seconds, without a model, and see which way a change moves the tail.

    python benchmarks/scheduler_sim.py                          # tiny workload, CPU cost model
    python benchmarks/scheduler_sim.py --fixed-ms 5 --per-row-ms 3.2 --workload benchmarks/workloads/gpu-512.json
    python benchmarks/scheduler_sim.py --smoke                  # CI

Each UNet call costs ``fixed + per_row × rows × (latent area / 16×16)``; VAE decode costs
a constant per request on its own thread beside the UNet, as in the engine: requests
released together are decoded one after another. The defaults are what the tiny model
measures on the 2-core development CPU (UNet 27 ms + 4.5 ms per row, decode 110 ms). Requests arrive as Poisson processes at fractions of the
continuous strategy's capacity, sampled from a workload file; the table gives p50/p99
latency per strategy and the ratio of each p99 to static batching's, the median over
``--seeds`` runs. Prints a table and writes JSON to benchmarks/results/scheduler_sim.json.

What it leaves out: the gateway, the VAE encode, image codecs, and the contention between
threads for the CPU, so its absolute latencies are optimistic. Use it for the shape of
the curves and for ranking policies; use ``serving_strategies.py`` for measurements.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.api import UpscaleRequest  # noqa: E402
from engine.request import Request  # noqa: E402
from engine.scheduler import POLICIES, Scheduler  # noqa: E402

STRATEGIES = [("continuous", policy) for policy in POLICIES] + [("static", "deadline")]


@dataclass(frozen=True)
class CostModel:
    fixed: float  # seconds per UNet call
    per_row: float  # seconds per row at a 16×16 latent, scaled by area
    decode: float  # seconds of VAE decode per request, beside the UNet

    def unet_call(self, shape: tuple[int, int], rows: int) -> float:
        area = (2 * shape[0]) * (2 * shape[1]) / 256  # the denoised latent is 2× the input's
        return self.fixed + self.per_row * area * rows


@dataclass(frozen=True)
class Job:
    arrival: float
    shape: tuple[int, int]  # padded input latent (h, w), as the engine computes it
    rows: int
    steps: int


def latent_side(pixels: int) -> int:
    return max(64, math.ceil(pixels / 32) * 32) // 8


def sample_jobs(mix: list[dict], count: int, rate: float | None, seed: int) -> list[Job]:
    """``count`` jobs from a workload mix; Poisson arrivals at ``rate``, or all at once."""
    rng = random.Random(seed)
    weights = [t.get("weight", 1) for t in mix]
    jobs, now = [], 0.0
    for _ in range(count):
        template = rng.choices(mix, weights=weights)[0]
        steps = template.get("steps", 20)
        steps = rng.randint(*steps) if isinstance(steps, list) else steps
        shape = (latent_side(template["height"]), latent_side(template["width"]))
        rows = 2 if template.get("CFGScale", 1.0) > 1 else 1
        if rate:
            now += rng.expovariate(rate)
        jobs.append(Job(now, shape, rows, steps))
    return jobs


def simulate(jobs: list[Job], mode: str, policy: str, cost: CostModel, max_rows: int, delay: float):
    """Latency of each job, and the time the last one finished."""
    clock = [0.0]
    scheduler = Scheduler(max_rows, mode=mode, policy=policy, static_delay=delay, clock=lambda: clock[0])
    latencies: list[float] = []
    next_job, vae_free = 0, 0.0
    while next_job < len(jobs) or scheduler.has_work:
        while next_job < len(jobs) and jobs[next_job].arrival <= clock[0]:
            job = jobs[next_job]
            api = UpscaleRequest(str(next_job), b"", steps=job.steps)
            scheduler.add(Request(api, arrival=job.arrival, shape=job.shape, rows=job.rows))
            next_job += 1
        batch = scheduler.schedule()
        if batch is None:  # idle, or static batching waiting for its window
            wait = scheduler.wait_time()
            upcoming = jobs[next_job].arrival if next_job < len(jobs) else math.inf
            clock[0] = min(upcoming, clock[0] + wait) if wait else upcoming
            continue
        clock[0] += cost.unet_call(batch.shape, batch.rows)
        for request in batch.requests:
            request.step_index += 1
        scheduler.finish([r for r in batch.requests if r.done_denoising])
        for request in scheduler.take_released():  # the VAE thread decodes one after another
            vae_free = max(vae_free, clock[0]) + cost.decode
            latencies.append(vae_free - request.arrival)
    return latencies, clock[0]


def run(args) -> dict:
    mix = json.loads(Path(args.workload).read_text())["mix"]
    cost = CostModel(args.fixed_ms / 1000, args.per_row_ms / 1000, args.decode_ms / 1000)
    burst = sample_jobs(mix, args.jobs, None, seed=0)
    capacity = {}
    for mode, policy in STRATEGIES:
        _, end = simulate(burst, mode, policy, cost, args.max_batch_rows, args.static_delay)
        capacity[f"{mode}/{policy}"] = len(burst) / end
    reference = capacity["continuous/deadline"]
    rows = []
    for load in args.loads:
        row = {"load": load, "rate": round(load * reference, 3)}
        for mode, policy in STRATEGIES:
            p50s, p99s = [], []
            for seed in range(args.seeds):
                jobs = sample_jobs(mix, args.jobs, load * reference, seed)
                latencies, _ = simulate(jobs, mode, policy, cost, args.max_batch_rows, args.static_delay)
                p50s.append(float(np.percentile(latencies, 50)))
                p99s.append(float(np.percentile(latencies, 99)))
            row[f"{mode}/{policy}"] = {"p50_s": statistics.median(p50s), "p99_s": statistics.median(p99s)}
        rows.append(row)
    return {"capacity_tasks_per_s": capacity, "loads": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", default=str(ROOT / "benchmarks" / "workloads" / "tiny.json"))
    parser.add_argument("--fixed-ms", type=float, default=27.0, help="cost of a UNet call, ms")
    parser.add_argument("--per-row-ms", type=float, default=4.5, help="cost per row at a 16×16 latent, ms")
    parser.add_argument("--decode-ms", type=float, default=110.0, help="VAE decode per request, ms")
    parser.add_argument("--max-batch-rows", type=int, default=16)
    parser.add_argument("--static-delay", type=float, default=0.05)
    parser.add_argument("--jobs", type=int, default=600, help="jobs per simulated run")
    parser.add_argument("--seeds", type=int, default=5, help="runs per point; medians are reported")
    parser.add_argument("--loads", default="0.25,0.5,0.75,0.95", help="fractions of continuous capacity")
    parser.add_argument("--smoke", action="store_true", help="a few jobs, one seed")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scheduler_sim.json"))
    args = parser.parse_args()
    args.loads = [float(x) for x in args.loads.split(",") if x]
    if args.smoke:
        args.jobs, args.seeds, args.loads = 40, 1, [0.75]
    report = run(args)
    names = [f"{mode}/{policy}" for mode, policy in STRATEGIES]
    print("capacity (tasks/s): " + ", ".join(f"{n} {report['capacity_tasks_per_s'][n]:.2f}" for n in names))
    print(f"{'load':>5} " + " ".join(f"{n + ' p50/p99 s':>32}" for n in names) + "   p99 ÷ static")
    for row in report["loads"]:
        static = row["static/deadline"]["p99_s"]
        cells = " ".join(f"{row[n]['p50_s']:>20.2f} / {row[n]['p99_s']:>7.2f}" for n in names)
        ratios = ", ".join(f"{row[n]['p99_s'] / static:.2f}" for n in names if not n.startswith("static"))
        print(f"{row['load']:>5.0%} {cells}   {ratios}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report.update(machine=platform.platform(), settings={k: v for k, v in vars(args).items() if k != "out"})
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
