"""``latent-upscaler upscale --url`` against the official ``runware`` SDK, one call per
image with ``asyncio.gather`` (the way its users batch), on the same images and the same
server, in one run.

    python benchmarks/cli_upscale.py                    # 500 images, null engine (~1 minute)
    python benchmarks/cli_upscale.py --engine tiny --images 100
    python benchmarks/cli_upscale.py --smoke            # 20 images, a few seconds

The server is the real ``GatewayServer`` in this process, with the null engine by default
(it answers at once with a 2x resize, so the figures are the clients' own costs) or the
tiny model. Each client is a process of its own that writes every output to disk, timed
from its start to its exit (what a user waits for; its own connect-to-last-write time is
reported too). The two take turns, ``--repeat`` times; medians are reported with their
ratio. Memory: the CLI's peak RSS (its VmHWM) on the measured run and on one with
``--rss-scale`` times as many images: flat means the same.

The SDK (``runware==0.5.24``, as ``tests/test_sdks.py`` pins it) runs from its own
virtualenv: ``--sdk-python PATH``, else the one ``tests/test_sdks.py`` builds in
``.sdk-envs/legacy`` (``$SDK_ENVS_DIR`` moves it), built here on first use (needs PyPI).
Writes JSON to benchmarks/results/cli_upscale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.client import InprocEngineClient, NullEngineClient  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from gateway.config import GatewayConfig  # noqa: E402
from gateway.server import GatewayServer  # noqa: E402

KEY = "bench-key"
SIZE = (48, 32)


def make_images(folder: Path, count: int) -> None:
    """``count`` distinct small PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        color = (i % 251, (i * 7) % 253, (i * 13) % 255)
        Image.new("RGB", SIZE, color).save(folder / f"{i:06}.png")


def run_measured(command: list[str]) -> dict:
    """Run ``command`` to its end: wall seconds, peak RSS (MiB), exit status, output.

    The peak is the process's own ``VmHWM``, read from /proc while it runs (the
    high-water mark of the image it exec'd; ``wait4``'s ``ru_maxrss`` would also count
    the moment it was a fork of this large process)."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        peak_kib = 0
        while process.poll() is None:
            peak_kib = max(peak_kib, _vm_hwm_kib(process.pid))
            time.sleep(0.01)
        seconds = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        return {
            "seconds": seconds,
            "peak_rss_mib": round(peak_kib / 1024, 1),
            "returncode": process.returncode,
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
        }


def _vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def count_outputs(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.name.endswith(".2x.png"))


async def run_cli(url: str, images: Path, out: Path, steps: int, concurrency: int | None = None) -> dict:
    command = [sys.executable, "-m", "gateway", "upscale", str(images), "--out", str(out)]
    command += ["--url", url, "--api-key", KEY, "--steps", str(steps), "--format", "png"]
    if concurrency:
        command += ["--concurrency", str(concurrency)]
    result = await asyncio.to_thread(run_measured, command)
    if result["returncode"] != 0:
        raise RuntimeError(f"the CLI failed ({result['returncode']}): {result['stderr'][-2000:]}")
    match = re.search(r"in ([\d.]+) s \(", result["stderr"])
    return {
        "images": count_outputs(out),
        "seconds": round(result["seconds"], 3),
        "client_seconds": float(match.group(1)) if match else None,
        "peak_rss_mib": result["peak_rss_mib"],
    }


async def run_sdk(python: str, url: str, images: Path, out: Path, steps: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    script = ROOT / "benchmarks" / "sdk_legacy_upscale.py"
    command = [python, str(script), url, KEY, str(images), str(out), str(steps)]
    result = await asyncio.to_thread(run_measured, command)
    if result["returncode"] != 0:
        raise RuntimeError(f"the SDK client failed: {result['stderr'][-2000:]}")
    summary = json.loads(result["stdout"].strip().splitlines()[-1])
    return {
        "images": count_outputs(out),
        "failures": summary["failures"],
        "seconds": round(result["seconds"], 3),
        "client_seconds": round(summary["seconds"], 3),
        "peak_rss_mib": result["peak_rss_mib"],
    }


def sdk_python(path: str | None) -> str:
    """The legacy SDK's interpreter: the given one, or tests/test_sdks.py's environment."""
    if path:
        return path
    from tests.test_sdks import _python_env  # builds .sdk-envs/legacy on first use

    try:
        return str(_python_env("legacy"))
    except BaseException as exc:  # pytest's skip/fail outcomes, outside pytest
        raise SystemExit(f"no runware SDK environment ({exc}); pass --sdk-python") from None


def engine_work(before, after) -> dict:
    """What the engine did during one run: calls, mean rows, seconds per stage."""
    calls = after.unet_calls - before.unet_calls
    return {
        "unet_calls": calls,
        "mean_rows": round((after.unet_rows - before.unet_rows) / calls, 2) if calls else None,
        "unet_s": round(after.unet_seconds - before.unet_seconds, 3),
        "encode_calls": after.encode_calls - before.encode_calls,
        "encode_s": round(after.encode_seconds - before.encode_seconds, 3),
        "decode_calls": after.decode_calls - before.decode_calls,
        "decode_s": round(after.decode_seconds - before.decode_seconds, 3),
    }


def median(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs if r[key] is not None), 3)


async def main_async(args, python: str, work: Path) -> dict:
    images = work / "images"
    make_images(images, args.images)
    engine = (
        NullEngineClient()
        if args.engine == "null"
        else InprocEngineClient(EngineConfig(model=args.engine, device="cpu", dtype="fp32"))
    )
    config = GatewayConfig(port=0, api_keys=(KEY,), engine=EngineConfig(model=args.engine))
    runs: dict[str, list[dict]] = {"cli": [], "sdk": []}
    async with GatewayServer(config, engine) as server:
        for turn in range(args.repeat):  # in turns, so that both see the same neighbours
            for name in ("cli", "sdk"):
                out = work / f"{name}-{turn}"
                before = engine.stats()
                if name == "cli":
                    run = await run_cli(server.url, images, out, args.steps, args.cli_concurrency)
                else:
                    run = await run_sdk(python, server.url, images, out, args.steps)
                run["engine"] = engine_work(before, engine.stats())
                runs[name].append(run)
                shutil.rmtree(out)
        many = work / "many"
        make_images(many, args.images * args.rss_scale)
        shutil.rmtree(images)
        scaled = await run_cli(server.url, many, work / "cli-many", args.steps, args.cli_concurrency)
    return {"runs": runs, "scaled": scaled}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--engine", default="null", help="'null' (answers at once) or a model, e.g. tiny")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs per client; medians are reported")
    parser.add_argument(
        "--rss-scale", type=int, default=4, help="the memory run has this many times the images"
    )
    parser.add_argument("--sdk-python", help="interpreter of a virtualenv with runware==0.5.24")
    parser.add_argument("--cli-concurrency", type=int, help="the CLI's --concurrency (default: its own)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cli_upscale.json"))
    args = parser.parse_args()
    if args.smoke:
        args.images, args.repeat, args.rss_scale = 20, 1, 2
    logging.basicConfig(level=logging.ERROR)
    python = sdk_python(args.sdk_python)
    with tempfile.TemporaryDirectory() as work:
        results = asyncio.run(main_async(args, python, Path(work)))
    runs, scaled = results["runs"], results["scaled"]
    summary = {}
    for name in ("cli", "sdk"):
        seconds = median(runs[name], "seconds")
        summary[name] = {
            "images": min(r["images"] for r in runs[name]),
            "seconds": seconds,
            "images_per_s": round(args.images / seconds, 1),
            "client_seconds": median(runs[name], "client_seconds"),
            "peak_rss_mib": median(runs[name], "peak_rss_mib"),
        }
    ratio = summary["cli"]["images_per_s"] / summary["sdk"]["images_per_s"]
    rss_ratio = scaled["peak_rss_mib"] / summary["cli"]["peak_rss_mib"]
    print(
        f"{args.images} images of {SIZE[0]}x{SIZE[1]}, engine {args.engine}, medians of {args.repeat} runs each"
    )
    print(f"{'client':<34} {'images':>7} {'wall s':>8} {'images/s':>9} {'own s':>7} {'peak RSS':>9}")
    labels = {"cli": "latent-upscaler upscale --url", "sdk": "runware 0.5.24, gather"}
    for name, row in summary.items():
        print(
            f"{labels[name]:<34} {row['images']:>7} {row['seconds']:>8.2f} {row['images_per_s']:>9.1f} "
            f"{row['client_seconds']:>7.2f} {row['peak_rss_mib']:>7.1f} MiB"
        )
    print(f"throughput ratio CLI/SDK: {ratio:.2f}x")
    print(
        f"CLI peak RSS: {summary['cli']['peak_rss_mib']:.1f} MiB for {args.images} images, "
        f"{scaled['peak_rss_mib']:.1f} MiB for {scaled['images']} ({rss_ratio:.2f}x)"
    )
    report = {
        "images": args.images,
        "image_size": list(SIZE),
        "engine": args.engine,
        "steps": args.steps,
        "repeat": args.repeat,
        "cli_concurrency": args.cli_concurrency,
        "summary": summary,
        "throughput_ratio_cli_over_sdk": round(ratio, 3),
        "cli_rss_scaled": scaled,
        "cli_rss_ratio": round(rss_ratio, 3),
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
