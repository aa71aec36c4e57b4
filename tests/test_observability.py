"""Logs and the dashboard, against real processes.

- ``serve`` (and a cluster gateway and worker) at DEBUG with JSON logs, used with API
  keys, a wrong key, data URIs, raw base64, uploads, presigned-looking URLs and base64
  outputs: every line is one JSON object, each task has its one line with its timings,
  and no key, payload, data URI or URL query string appears anywhere.
- The Grafana dashboard: every metric its queries use is one the processes export.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from websockets.asyncio.client import connect

from engine.client import NullEngineClient
from tests.cluster_harness import INSTALL_HINT, REDIS_SERVER, Cluster, RedisProcess
from tests.conftest import Client, data_uri, free_port, serve_command, serving, upscale_task

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "latent-upscaler.json"
KEY = "k3y-that-must-never-be-logged-5f1e"
WRONG_KEY = "wr0ng-key-that-must-never-be-logged-9a2c"
SIGNATURE = "X-Amz-Signature=5ec12e7516a7ure0123456789abcdef"
LOG_FIELDS = {"time", "level", "logger", "message"}


def noisy_png(width: int, height: int) -> bytes:
    """Random pixels: a long base64 payload whose fragments appear nowhere else."""
    image = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def fragments(*payloads: str) -> list[str]:
    """A few 24-character pieces of each base64 payload (start, middle, end), and the
    first and last 12 characters of each key (a log that elides the middle of a frame
    still shows those)."""
    out = [part for key in (KEY, WRONG_KEY) for part in (key[:12], key[-12:])]
    for payload in payloads:
        body = payload.split(",", 1)[-1]
        assert len(body) > 200
        out += [body[40:64], body[len(body) // 2 : len(body) // 2 + 24], body[-64:-40], body[-24:]]
    return out


def json_lines(text: str) -> list[dict]:
    """Every line must be one JSON object with the four base fields."""
    lines = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        line = json.loads(raw)  # fails the test on any line that is not JSON
        assert set(line) >= LOG_FIELDS, raw
        lines.append(line)
    return lines


def assert_nothing_secret(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret!r} was logged"
    assert not re.search(r"base64,[A-Za-z0-9+/]{8}", text), "a data URI was logged"
    assert not re.search(r"[A-Za-z0-9+/]{80}", text), "a base64 run was logged"


async def wait_ready(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while True:
            assert process.poll() is None, "the server exited"
            try:
                if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server was not ready in time"
            await asyncio.sleep(0.1)


async def use_everything(url: str, local_http, rest_url: str) -> tuple[list[str], dict]:
    """Tasks that carry every secret and payload there is, over WebSocket and REST;
    returns the payloads sent and received (as base64 or data URIs) and the terminal
    items by taskUUID."""
    inputs = [data_uri(noisy_png(48, 40)), base64.b64encode(noisy_png(40, 32)).decode()]
    upload_input = data_uri(noisy_png(36, 36))
    local_http.files[f"/in.png?{SIGNATURE}"] = (noisy_png(32, 32), "image/png")
    tasks = [
        upscale_task(inputs[0], outputType="base64Data"),
        upscale_task(inputs[1], outputType="dataURI", outputFormat="WEBP"),
        upscale_task(
            inputs[0],
            outputType="URL",
            uploadEndpoint=f"{local_http.url}/put/out.png?{SIGNATURE}",
            webhookURL=f"{local_http.url}/hook?token={SIGNATURE}",
        ),
        upscale_task(f"{local_http.url}/in.png?{SIGNATURE}", outputType="base64Data"),
        upscale_task(data_uri(b"not an image, just words " * 20)),
    ]
    later = upscale_task(inputs[1], deliveryMethod="async", outputType="base64Data")
    upload = {"taskType": "imageUpload", "taskUUID": upscale_task()["taskUUID"], "image": upload_input}
    async with connect(url, max_size=2**26) as ws:
        c = Client(ws)
        assert (await c.error([{"taskType": "authentication", "apiKey": WRONG_KEY}]))["code"] == "invalidApiKey"
    async with connect(url, max_size=2**26) as ws:
        c = Client(ws)
        await c.auth(KEY)
        seen = await c.run([*tasks, upload], timeout=120)
        await c.send([later])
        await c.recv()
        polled = None
        for _ in range(600):
            await c.send([{"taskType": "getResponse", "taskUUID": later["taskUUID"]}])
            polled = (await c.recv())["data"][0]
            if polled.get("status") == "success":
                break
            await asyncio.sleep(0.1)
    over_rest = upscale_task(data_uri(noisy_png(44, 28)), outputType="dataURI")
    async with httpx.AsyncClient(timeout=120) as http:
        refused = await http.post(rest_url, json=[upscale_task()], headers={"Authorization": f"Bearer {WRONG_KEY}"})
        assert refused.status_code == 401
        answer = await http.post(rest_url, json=[over_rest], headers={"Authorization": f"Bearer {KEY}"})
    inputs.append(over_rest["inputImage"])
    items = {uuid: found[-1] for uuid, found in seen.items()}
    items[later["taskUUID"]] = polled
    items[over_rest["taskUUID"]] = answer.json()["data"][0]
    outputs = [i.get("imageBase64Data") or i.get("imageDataURI") for i in items.values()]
    assert sum(1 for o in outputs if o) == 5, items
    assert [i.get("code") for i in items.values()].count(None) == len(items) - 1, items
    assert items[tasks[-1]["taskUUID"]]["code"] == "invalidInputImage"
    return [*inputs, upload_input, *(o for o in outputs if o)], items


def assert_task_lines(lines: list[dict], items: dict, **expected) -> None:
    """One gateway.tasks line per task, with its outcome and timings by stage."""
    task_lines = [line for line in lines if line["logger"] == "gateway.tasks"]
    by_uuid = {line["taskUUID"]: line for line in task_lines}
    assert len(by_uuid) == len(task_lines)  # one line per task
    for task_uuid, item in items.items():
        line = by_uuid[task_uuid]
        assert line["level"] == "INFO" and line["outcome"] == item.get("code", "success"), line
        assert line["seconds"]["total"] >= 0 and line["connectionSessionUUID"]
        for key, value in expected.items():
            assert line[key] == value
    upscaled = [line for line in task_lines if line["taskType"] != "imageUpload" and line["outcome"] == "success"]
    assert upscaled and all({"queue", "denoise", "decode", "deliver"} <= set(line["seconds"]) for line in upscaled)


async def test_serve_json_logs_at_debug_hold_no_keys_payloads_or_signed_urls(local_http, tmp_path):
    port, http_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    command = serve_command(port, "--log-level", "DEBUG", "--log-format", "json", "--api-key", KEY)
    command += ["--allow-private-networks", "--http-port", str(http_port)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        await wait_ready(port, process)
        rest_url = f"http://127.0.0.1:{http_port}/v1"
        payloads, items = await use_everything(f"ws://127.0.0.1:{port}/v1", local_http, rest_url)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    text = log.read_text()
    lines = json_lines(text)
    assert {line["level"] for line in lines} >= {"DEBUG", "INFO"}
    assert any(line["logger"].startswith("httpcore") for line in lines)  # DEBUG really was on
    assert_task_lines(lines, items)
    assert_nothing_secret(text, [KEY, WRONG_KEY, SIGNATURE, "5ec12e7516a7ure", *fragments(*payloads)])
    assert len(local_http.received) == 2  # the upload and the webhook did go out


def dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) > 20
    names = {n for e in exprs for n in re.findall(r"\b((?:latent_upscaler|process|python)_[a-z_]+)\b", e)}
    assert all(any(n in e for n in names) for e in exprs)  # each query uses at least one
    return names


async def exported(port: int) -> set[str]:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    from prometheus_client.parser import text_string_to_metric_families

    families = list(text_string_to_metric_families(text))
    # Sample names (histograms' _bucket/_sum/_count, counters' _total), and the names of
    # gauge families that have no series right now (per-shape backlog while idle).
    return {s.name for f in families for s in f.samples} | {f.name for f in families if f.type == "gauge"}


async def test_the_dashboard_uses_only_what_serve_exports_outside_the_cluster_panels():
    async with serving(engine=NullEngineClient()) as server:
        names = await exported(server.port)
    used = {n for n in dashboard_metrics() if not n.startswith(("latent_upscaler_cluster_", "latent_upscaler_worker_"))}
    assert used <= names, used - names


async def metrics_once(role, *lines: str, timeout: float = 20) -> str:
    """The role's /metrics once it shows every one of ``lines`` (a gateway reads the
    cluster's queue in the background, every --claim-timeout here)."""
    deadline = time.monotonic() + timeout
    while True:
        text = (await role.get("/metrics")).text
        if all(line in text for line in lines):
            return text
        assert time.monotonic() < deadline, [line for line in text.splitlines() if "cluster" in line]
        await asyncio.sleep(0.2)


@pytest.fixture
def redis_for_logs(tmp_path):
    if REDIS_SERVER is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"redis-server is missing in CI; {INSTALL_HINT}")
        pytest.skip(f"redis-server is not installed; {INSTALL_HINT}")
    server = RedisProcess(tmp_path).start()
    yield server
    server.stop()


@pytest.mark.cluster
async def test_cluster_json_logs_hold_no_secrets_and_the_dashboard_matches_every_role(
    redis_for_logs, tmp_path, local_http
):
    debug_json = ["--log-level", "DEBUG", "--log-format", "json", "--allow-private-networks"]
    cluster = Cluster(redis_for_logs, tmp_path, common=["--claim-timeout", "2", "--shutdown-grace", "3", *debug_json])
    gateway = cluster.gateway("gw", "--api-key", KEY)  # REST on gateway.rest too
    try:
        await cluster.ready(gateway)
        # No worker yet: queued tasks are the backlog, on the gateway's metrics.
        queued = [upscale_task(deliveryMethod="async") for _ in range(3)]
        async with connect(gateway.url) as ws:
            c = Client(ws)
            await c.auth(KEY)
            await c.send(queued)
            assert all(["data" in await c.recv() for _ in queued])
        waiting = await metrics_once(gateway, "latent_upscaler_cluster_backlog_tasks 3.0")
        assert 'latent_upscaler_cluster_shape_backlog_tasks{shape="8x8"} 3.0' in waiting  # 40x24 → 64x64 px
        assert "latent_upscaler_cluster_workers 0.0" in waiting
        worker = cluster.worker("w1")
        await cluster.ready(worker)
        payloads, items = await use_everything(gateway.url, local_http, gateway.rest)
        async with serving(engine=NullEngineClient()) as server:
            names = await exported(server.port)
        names |= await exported(gateway.port) | await exported(worker.port)
        worker_metrics = (await worker.get("/metrics")).text
        gateway_metrics = await metrics_once(
            gateway,
            "latent_upscaler_cluster_backlog_tasks 0.0",
            "latent_upscaler_cluster_held_tasks 0.0",
            "latent_upscaler_cluster_workers 1.0",
        )
    finally:
        cluster.close()
    used = dashboard_metrics()
    assert used <= names, used - names
    # The worker counts the tasks it ran; the gateway exports the queue it sees.
    ran = len(queued) + sum(1 for i in items.values() if i.get("taskType") != "imageUpload" and "code" not in i)
    assert f'latent_upscaler_tasks_total{{outcome="success",task_type="imageUpscale"}} {ran}.0' in worker_metrics
    assert 'latent_upscaler_tasks_total{outcome="success",task_type="imageUpscale"} 0.0' in gateway_metrics
    assert "latent_upscaler_cluster_redis_up 1.0" in gateway_metrics
    # Logs: JSON lines only, the worker's with its id, no secret anywhere.
    gateway_text, worker_text = gateway.log.read_text(), worker.log.read_text()
    gateway_lines, worker_lines = json_lines(gateway_text), json_lines(worker_text)
    assert all(line["workerId"] == "w1" for line in worker_lines)
    assert all(line["gatewayId"].startswith("gateway-") for line in gateway_lines)
    upscales = {u: i for u, i in items.items() if i.get("taskType") != "imageUpload" and "code" not in i}
    assert_task_lines(worker_lines, upscales, workerId="w1")
    assert all("cluster_queue" in line["seconds"] for line in worker_lines if line["logger"] == "gateway.tasks")
    for text in (gateway_text, worker_text):
        assert_nothing_secret(text, [KEY, WRONG_KEY, SIGNATURE, "5ec12e7516a7ure", *fragments(*payloads)])
