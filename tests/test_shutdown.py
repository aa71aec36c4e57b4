"""SIGTERM: stop accepting, finish in-flight tasks within the grace period, exit 0.
A model that cannot be loaded: a clear one-line error and exit code 2."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import httpx
import orjson
from websockets.asyncio.client import connect

from tests.conftest import data_uri, free_port, png_bytes, serve_command, upscale_task

ROOT = Path(__file__).resolve().parent.parent


def start_server(port: int, *extra: str) -> subprocess.Popen:
    command = serve_command(port, "--log-level", "WARNING", *extra)
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


async def wait_ready(port: int, process: subprocess.Popen) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(600):
            assert process.poll() is None, process.stdout.read().decode()
            try:
                if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError("server never became ready")


async def test_sigterm_finishes_in_flight_tasks_then_exits_cleanly():
    port = free_port()
    process = start_server(port, "--shutdown-grace", "60")
    try:
        await wait_ready(port, process)
        task = upscale_task(data_uri(png_bytes(128, 128)), settings={"steps": 40})
        async with connect(f"ws://127.0.0.1:{port}/v1") as ws:
            await ws.send('[{"taskType":"authentication","apiKey":"k"}]')
            await ws.recv()
            await ws.send(orjson.dumps([task]).decode())
            await asyncio.sleep(0.5)  # the task is running
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            try:  # new connections are refused while it drains
                async with connect(f"ws://127.0.0.1:{port}/v1", open_timeout=2):
                    refused = False
            except (OSError, TimeoutError, Exception):
                refused = True
            item = orjson.loads(await asyncio.wait_for(ws.recv(), 120))["data"][0]
        assert item["taskUUID"] == task["taskUUID"] and item["status"] == "success"
        assert refused
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_an_unloadable_model_is_a_clear_error(tmp_path):
    started = time.monotonic()
    result = subprocess.run(
        serve_command(free_port(), model=str(tmp_path / "missing")),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--model tiny" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 120


def test_a_public_host_without_a_key_refuses_to_start():
    result = subprocess.run(
        serve_command(free_port(), "--host", "0.0.0.0"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "without an API key" in result.stderr
