"""Engine throughput: the stock diffusers pipeline, one request at a time, against the
engine's step-level continuous batching, on the same mixed workload in one run.

    python benchmarks/engine_throughput.py --model tiny --model small
    python benchmarks/engine_throughput.py --smoke          # a few seconds, for CI

Prints a table and writes JSON to benchmarks/results/engine_throughput.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import platform
import queue
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionLatentUpscalePipeline
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.api import OutputFormat, UpscaleRequest, UpscaleResult  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.core import EngineCore  # noqa: E402
from engine.loader import ensure_builtin_model, load_pipeline  # noqa: E402

SIZES = {"tiny": [(64, 64), (96, 64), (64, 96)], "small": [(64, 64), (96, 64)]}


def workload(model: str, count: int, steps: tuple[int, int], seed: int = 0) -> list[dict]:
    """``count`` requests over 2–3 sizes, steps in ``steps``, a third with CFG > 1."""
    rng = random.Random(seed)
    sizes = SIZES.get(model, SIZES["small"])
    jobs = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        guided = i % 3 == 0
        jobs.append(
            dict(
                width=w,
                height=h,
                steps=rng.randint(*steps),
                cfg_scale=7.5 if guided else rng.choice([0.0, 1.0]),
                prompt=rng.choice(["a castle", "a forest at dawn", "a portrait", ""]),
                negative_prompt="blurry" if guided else "",
                seed=rng.randrange(2**32),
                image=_png(w, h, i),
            )
        )
    return jobs


def _png(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(h // 4, w // 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h)).save(buf, format="PNG")
    return buf.getvalue()


def _count_calls(unet) -> list[int]:
    calls: list[int] = []
    forward = unet.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    unet.forward = counted
    return calls


def run_stock(config: EngineConfig, jobs: list[dict]) -> dict:
    loaded = load_pipeline(config)
    pipe: StableDiffusionLatentUpscalePipeline = loaded.pipeline
    pipe.set_progress_bar_config(disable=True)
    calls = _count_calls(pipe.unet)
    start, cpu_start = time.perf_counter(), time.process_time()
    latencies = []
    for job in jobs:
        pipe(
            prompt=job["prompt"],
            image=Image.open(io.BytesIO(job["image"])).convert("RGB"),
            num_inference_steps=job["steps"],
            guidance_scale=job["cfg_scale"],
            negative_prompt=job["negative_prompt"] or None,
            generator=torch.Generator("cpu").manual_seed(job["seed"]),
        ).images[0].save(io.BytesIO(), format="PNG")
        latencies.append(time.perf_counter() - start)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return _summary("stock pipeline, one at a time", len(jobs), elapsed, cpu, len(calls), latencies)


def run_engine(config: EngineConfig, jobs: list[dict]) -> dict:
    core = EngineCore.load(config)
    calls = _count_calls(core.runner.unet)
    outputs: queue.SimpleQueue = queue.SimpleQueue()
    core.start(outputs.put)
    start, cpu_start = time.perf_counter(), time.process_time()
    for i, job in enumerate(jobs):
        core.add_request(
            UpscaleRequest(
                request_id=str(i),
                image=job["image"],
                prompt=job["prompt"],
                negative_prompt=job["negative_prompt"],
                steps=job["steps"],
                cfg_scale=job["cfg_scale"],
                seed=job["seed"],
                output_format=OutputFormat.PNG,
            )
        )
    latencies, failed = [], 0
    while len(latencies) + failed < len(jobs):
        out = outputs.get(timeout=600)
        if isinstance(out, UpscaleResult):
            latencies.append(time.perf_counter() - start)
        else:
            failed += 1
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    core.shutdown()
    if failed:
        raise RuntimeError(f"{failed} engine requests failed")
    return _summary(f"engine, {config.mode} batching", len(jobs), elapsed, cpu, len(calls), latencies)


def _summary(name: str, n: int, elapsed: float, cpu: float, unet_calls: int, latencies: list[float]) -> dict:
    return {
        "strategy": name,
        "tasks": n,
        "seconds": round(elapsed, 3),
        "tasks_per_s": round(n / elapsed, 3),
        "cpu_s_per_task": round(cpu / n, 3),
        "unet_calls": unet_calls,
        "p50_latency_s": round(float(np.percentile(latencies, 50)), 3),
        "p99_latency_s": round(float(np.percentile(latencies, 99)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", help="tiny, small (repeatable; default both)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--min-steps", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--max-batch-rows", type=int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for the engine's model and VAE threads (default: half the cores each)",
    )
    parser.add_argument(
        "--stock-threads",
        type=int,
        default=None,
        help="torch CPU threads for the stock pipeline (default: all cores, torch's own default)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model, 6 requests, 2–4 steps")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine_throughput.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    models = args.model or ["tiny", "small"]
    count, steps = args.requests, (args.min_steps, args.max_steps)
    if args.smoke:
        models, count, steps = ["tiny"], 6, (2, 4)

    stock_threads = args.stock_threads or os.cpu_count() or 1
    report = {
        "machine": platform.platform(),
        "cores": os.cpu_count(),
        "engine_torch_threads": args.threads or "half the cores, in each of 2 threads",
        "stock_torch_threads": stock_threads,
        "runs": [],
    }
    print(
        f"{'model':8} {'strategy':34} {'tasks/s':>9} {'CPU s/task':>11} {'UNet calls':>11} "
        f"{'p50 s':>8} {'p99 s':>8} {'ratio':>7}"
    )
    for model in models:
        ensure_builtin_model(model)
        config = EngineConfig(
            model=model,
            device=args.device,
            dtype=args.dtype,
            max_batch_rows=args.max_batch_rows,
            max_queue=10_000,
            torch_threads=args.threads,
        )
        jobs = workload(model, count, steps)
        stock = run_stock(dataclasses.replace(config, torch_threads=stock_threads), jobs)
        ours = run_engine(config, jobs)
        ratio = ours["tasks_per_s"] / stock["tasks_per_s"]
        for row, r in ((stock, 1.0), (ours, ratio)):
            print(
                f"{model:8} {row['strategy']:34} {row['tasks_per_s']:9.2f} {row['cpu_s_per_task']:11.3f} "
                f"{row['unet_calls']:11d} "
                f"{row['p50_latency_s']:8.2f} {row['p99_latency_s']:8.2f} {r:6.2f}x"
            )
        report["runs"].append(
            {
                "model": model,
                "requests": count,
                "steps": steps,
                "stock": stock,
                "engine": ours,
                "throughput_ratio": round(ratio, 3),
            }
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
