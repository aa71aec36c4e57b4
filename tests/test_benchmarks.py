"""Benchmark scripts run end to end on the tiny model, so they cannot rot.
No timing is asserted: timing belongs in benchmarks/, not in tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_smoke(script: str, out: Path, timeout: int) -> dict:
    """Run ``benchmarks/<script> --smoke`` to completion and return the JSON it wrote."""
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out)],
        check=True,
        timeout=timeout,
        capture_output=True,
    )
    return json.loads(out.read_text())


def test_engine_throughput_smoke(tmp_path):
    out = tmp_path / "engine.json"
    report = run_smoke("engine_throughput.py", out, timeout=600)
    run = report["runs"][0]
    assert run["model"] == "tiny"
    assert run["engine"]["tasks"] == run["stock"]["tasks"] == 6
    assert run["engine"]["unet_calls"] < run["stock"]["unet_calls"]


def test_serving_strategies_smoke(tmp_path):
    out = tmp_path / "strategies.json"
    report = run_smoke("serving_strategies.py", out, timeout=900)
    assert set(report["results"]) == {"continuous", "static", "stock"}
    assert report["all_exactly_once"]
    assert out.with_suffix(".png").stat().st_size > 0


def test_gateway_overhead_smoke(tmp_path):
    out = tmp_path / "overhead.json"
    report = run_smoke("gateway_overhead.py", out, timeout=300)
    assert report["all_exactly_once"] and report["throughput_ratio"] > 0
    assert report["metrics_throughput_ratio"] > 0  # the gateway with and without metrics
    rest = report["runs"]["gateway-rest"]["saturated"]
    assert report["rest_throughput_ratio"] > 0 and rest["succeeded"] == rest["tasks"]


def test_http_transports_smoke(tmp_path):
    out = tmp_path / "transports.json"
    report = run_smoke("http_transports.py", out, timeout=300)
    assert report["all_exactly_once"]
    assert set(report["throughput_vs_websockets"]) == {"websockets-ws", "aiohttp-ws", "aiohttp-rest"}


@pytest.mark.cluster
def test_cluster_scaling_smoke(tmp_path):
    from tests.cluster_harness import INSTALL_HINT, REDIS_SERVER

    if REDIS_SERVER is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"redis-server is missing in CI; {INSTALL_HINT}")
        pytest.skip(f"redis-server is not installed; {INSTALL_HINT}")
    out = tmp_path / "cluster.json"
    report = run_smoke("cluster_scaling.py", out, timeout=600)
    assert [row["workers"] for row in report["scaling"]] == [1, 2]
    assert all(row["unanswered"] == row["answered_more_than_once"] == 0 for row in report["scaling"])
    assert report["latency"]["exactly_once"]
    chaos = report["chaos"]["chaos"]
    assert chaos["killed"] and chaos["unanswered"] == chaos["answered_more_than_once"] == 0
    assert "SIMULATED" in report["note"] and out.with_suffix(".png").stat().st_size > 0


def test_scheduler_sim_smoke(tmp_path):
    out = tmp_path / "sim.json"
    report = run_smoke("scheduler_sim.py", out, timeout=120)
    assert set(report["capacity_tasks_per_s"]) == {
        "continuous/deadline",
        "continuous/round-robin",
        "static/deadline",
    }
    point = report["loads"][0]
    assert point["load"] == 0.75 and all(
        point[k]["p99_s"] >= point[k]["p50_s"] > 0 for k in report["capacity_tasks_per_s"]
    )


def test_scheduler_sim_finishes_every_job_once():
    """The simulation drives the real scheduler: every job of a burst finishes exactly once."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.scheduler_sim import CostModel, sample_jobs, simulate

    mix = [{"width": 64, "height": 64, "steps": [2, 9], "CFGScale": 7.5}, {"width": 96, "height": 64}]
    jobs = sample_jobs(mix, 50, rate=5.0, seed=3)
    for mode, policy in (("continuous", "deadline"), ("continuous", "round-robin"), ("static", "deadline")):
        latencies, end = simulate(jobs, mode, policy, CostModel(0.01, 0.001, 0.0), 8, 0.05)
        assert len(latencies) == 50 and min(latencies) > 0 and end >= jobs[-1].arrival


@pytest.mark.soak
def test_short_soak(tmp_path):
    """20 s-sized soak: random hang-ups and resumes, every task answered exactly once.
    RSS growth is bounded loosely here (short runs are noisy); the full run asks < 10 %."""
    out = tmp_path / "soak.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "soak.py"),
            "--duration",
            "8",
            "--connections",
            "5",
            "--drop-rate",
            "0.1",
            "--out",
            str(out),
        ],
        timeout=300,
        capture_output=True,
    )
    report = json.loads(out.read_text())
    assert report["tasks"] > 10 and report["drops_and_resumes"] > 0
    assert report["unanswered"] == 0 and report["answered_more_than_once"] == 0
    assert report["rss_growth_pct"] < 25


@pytest.mark.sdk
def test_cli_upscale_smoke(tmp_path):
    """The CLI and the runware SDK (its own virtualenv, as tests/test_sdks.py builds it)
    each upscale the same 20 images against the same server; every output written."""
    from tests.test_sdks import _python_env

    out = tmp_path / "cli.json"
    script = ROOT / "benchmarks" / "cli_upscale.py"
    command = [sys.executable, str(script), "--smoke", "--sdk-python", str(_python_env("legacy"))]
    subprocess.run([*command, "--out", str(out)], check=True, timeout=300, capture_output=True)
    report = json.loads(out.read_text())
    assert report["summary"]["cli"]["images"] == report["summary"]["sdk"]["images"] == 20
    assert report["cli_rss_scaled"]["images"] == 40
    assert report["throughput_ratio_cli_over_sdk"] > 0 and report["cli_rss_ratio"] > 0


def test_s3_clients_smoke(tmp_path):
    from tests.s3_harness import INSTALL_HINT, MOTO_INSTALLED

    if not MOTO_INSTALLED:
        if os.environ.get("CI") == "true":
            pytest.fail(f"moto's server mode is missing in CI; {INSTALL_HINT}")
        pytest.skip(f"moto's server mode is not installed; {INSTALL_HINT}")
    out = tmp_path / "s3.json"
    report = run_smoke("s3_clients.py", out, timeout=300)
    assert set(report["results"]) == {"obstore", "aiobotocore"}
    for ops in report["results"].values():
        assert all(ops[op]["requests"] > 0 and ops[op]["cpu_ms_per_request"] > 0 for op in ops)
    assert report["ratios_aiobotocore_over_obstore"]["get"]["cpu_ms_per_request"] > 0
