"""Benchmark scripts run end to end on the tiny model, so they cannot rot.
No timing is asserted: timing belongs in benchmarks/, not in tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_engine_throughput_smoke(tmp_path):
    out = tmp_path / "engine.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "engine_throughput.py"), "--smoke", "--out", str(out)],
        check=True,
        timeout=600,
        capture_output=True,
    )
    report = json.loads(out.read_text())
    run = report["runs"][0]
    assert run["model"] == "tiny"
    assert run["engine"]["tasks"] == run["stock"]["tasks"] == 6
    assert run["engine"]["unet_calls"] < run["stock"]["unet_calls"]
