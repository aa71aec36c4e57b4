"""``GET /metrics``: a real server over real sockets, scraped and parsed with
prometheus_client's own parser after a mixed burst (successes and failures of every
kind), with the null engine and with the real engine (tiny model)."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
from prometheus_client.parser import text_string_to_metric_families

from engine.client import InprocEngineClient, NullEngineClient
from gateway.config import GatewayConfig
from gateway.metrics import row_buckets
from tests.conftest import TINY, client, data_uri, free_port, png_bytes, serving, upscale_task, wait_until


async def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of ``GET /metrics``, by (name, sorted labels)."""
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def by_label(samples: dict, name: str, label: str) -> dict[str, float]:
    return {dict(key)[label]: v for (n, key), v in samples.items() if n == name}


def outcomes(samples: dict) -> Counter:
    """latent_upscaler_tasks_total by (task_type, outcome), zeros left out."""
    found = Counter()
    for (name, labels), number in samples.items():
        if name == "latent_upscaler_tasks_total" and number:
            found[(dict(labels)["task_type"], dict(labels)["outcome"])] = int(number)
    return found


async def test_a_mixed_burst_is_counted_per_outcome_and_gauges_return_to_idle(local_http):
    local_http.files["/in.png"] = (png_bytes(30, 20), "image/png")
    config = GatewayConfig(port=0, http_port=0, allow_private_networks=True)
    not_an_image = data_uri(b"this is not an image at all", "image/png")
    ok = [upscale_task() for _ in range(5)]
    later = [upscale_task(deliveryMethod="async") for _ in range(2)]
    bad = [upscale_task(not_an_image) for _ in range(2)]  # fails in the engine
    fetched = upscale_task(local_http.url + "/in.png", webhookURL=local_http.url + "/hook")
    missing = upscale_task(local_http.url + "/missing.png")  # HTTP 404: refused after acceptance
    refused = [upscale_task(model="someone:else@1"), upscale_task(settings={"steps": 500})]
    uploads = [
        {"taskType": "imageUpload", "taskUUID": upscale_task()["taskUUID"], "image": data_uri(png_bytes(8, 8))},
        {"taskType": "imageUpload", "taskUUID": upscale_task()["taskUUID"], "image": not_an_image},
    ]
    async with serving(config, NullEngineClient()) as server:
        async with client(server) as c:
            seen = await c.run([*ok, *bad, fetched, missing, *refused, *uploads])
            await c.send(later)
            acks = [await c.recv() for _ in later]  # async: an acknowledgement, no result
            conflict = await c.error([ok[0]])  # a known taskUUID, refused at admission
            await wait_until(lambda: len(local_http.received) == 1)  # the webhook
            async with httpx.AsyncClient(headers={"Authorization": "Bearer test-key"}) as rest:
                over_rest = (await rest.post(server.http_url, json=[upscale_task()])).json()
                during = await scrape(server.port)
        assert all("data" in ack for ack in acks)
        assert over_rest["data"][0]["status"] == "success"
        await wait_until(lambda: len(server.connections) == 0 and not server.gateway.busy)
        after = await scrape(server.port)

    # Counters: exactly what the client received, per task type and outcome.
    # The async ones are counted when done; one more success came over REST.
    expected = Counter({("imageUpscale", "success"): len(later) + 1})
    for items in seen.values():
        item = items[-1]
        task_type = "imageUpload" if item["taskType"] == "imageUpload" else "imageUpscale"
        expected[(task_type, item.get("code", "success"))] += 1
    expected[("imageUpscale", conflict["code"])] += 1
    assert outcomes(after) == expected
    assert expected[("imageUpscale", "invalidInputImage")] == len(bad) + 1  # + the URL that 404s
    assert {("imageUpscale", "invalidModel"), ("imageUpscale", "invalidSteps")} <= set(expected)
    assert expected[("imageUpload", "success")] == 1 and sum(expected.values()) == 17
    # Latency: every task that was accepted (refused ones are counted, not timed).
    count = "latent_upscaler_task_latency_seconds_count"
    assert value(after, count, delivery="sync") == len(ok) + len(bad) + 3
    assert value(after, count, delivery="async") == len(later)
    assert value(after, "latent_upscaler_task_latency_seconds_bucket", delivery="sync", le="+Inf") == len(ok) + 5
    # Outbound requests, by kind and outcome.
    outbound = "latent_upscaler_outbound_requests_total"
    assert value(after, outbound, kind="input", outcome="success") == 1
    assert value(after, outbound, kind="input", outcome="status") == 1
    assert value(after, outbound, kind="webhook", outcome="success") == 1
    assert value(after, outbound, kind="upload", outcome="success") == 0
    # Gauges: busy while connected, idle after.
    assert by_label(during, "latent_upscaler_connections", "transport") == {"websocket": 1, "rest": 1}
    assert value(during, "latent_upscaler_sessions", state="attached") == 1
    assert by_label(after, "latent_upscaler_connections", "transport") == {"websocket": 0, "rest": 0}
    assert by_label(after, "latent_upscaler_sessions", "state") == {"attached": 0, "detached": 1}
    assert value(after, "latent_upscaler_tasks_in_flight") == 0
    assert by_label(after, "latent_upscaler_engine_requests", "state") == {"waiting": 0, "denoising": 0, "decoding": 0}
    assert value(after, "latent_upscaler_image_store_bytes") > 0
    assert value(after, "latent_upscaler_info", role="serve", model=config.engine.model) == 1


async def test_engine_histograms_match_the_engines_own_counters():
    config = GatewayConfig(port=0, engine=TINY)
    tasks = [
        upscale_task(data_uri(png_bytes(40, 24, (i * 40, 9, 9))), settings={"steps": 2 + i % 2, "CFGScale": 1.0 + i})
        for i in range(4)
    ]
    async with serving(config, InprocEngineClient(TINY)) as server:
        async with client(server) as c:
            seen = await c.run(tasks, timeout=120)
        assert all(items[-1]["status"] == "success" for items in seen.values())
        samples = await scrape(server.port)
        stats = server.gateway.engine.stats()
    assert stats.unet_calls > 0 and stats.decode_calls > 0
    # Rows per call: _count is the calls, _sum the rows (their ratio the mean batch).
    assert value(samples, "latent_upscaler_unet_batch_rows_count") == stats.unet_calls
    assert value(samples, "latent_upscaler_unet_batch_rows_sum") == stats.unet_rows
    assert value(samples, "latent_upscaler_unet_step_seconds_count") == stats.unet_calls
    assert abs(value(samples, "latent_upscaler_unet_step_seconds_sum") - stats.unet_seconds) < 1e-6
    rows = by_label(samples, "latent_upscaler_unet_batch_rows_bucket", "le")
    assert set(rows) == {*(str(float(b)) for b in row_buckets(TINY.max_batch_rows)), "+Inf"}
    for op, calls, items in (("encode", stats.encode_calls, stats.encoded), ("decode", stats.decode_calls, stats.decoded)):
        assert value(samples, "latent_upscaler_vae_seconds_count", op=op) == calls
        assert value(samples, "latent_upscaler_vae_items_total", op=op) == items == len(tasks)
    assert value(samples, "latent_upscaler_queue_wait_seconds_count") == len(tasks)
    assert by_label(samples, "latent_upscaler_engine_requests", "state") == {"waiting": 0, "denoising": 0, "decoding": 0}
    assert value(samples, "latent_upscaler_tasks_total", task_type="imageUpscale", outcome="success") == len(tasks)


async def test_metrics_can_move_to_their_own_port_or_be_turned_off():
    port = free_port()
    async with serving(GatewayConfig(port=0, metrics_port=port), NullEngineClient()) as server:
        assert server.metrics_port == port
        async with client(server) as c:
            await c.run([upscale_task()])
        samples = await scrape(port)
        assert value(samples, "latent_upscaler_tasks_total", task_type="imageUpscale", outcome="success") == 1
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"http://127.0.0.1:{server.port}/metrics")).status_code == 404
            assert (await http.get(f"http://127.0.0.1:{port}/stats")).status_code == 404  # metrics only
    async with serving(GatewayConfig(port=0, metrics=False), NullEngineClient()) as server:
        assert server.metrics is None and server.gateway.metrics is None
        async with client(server) as c:
            await c.run([upscale_task()])
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"http://127.0.0.1:{server.port}/metrics")).status_code == 404


async def test_a_scrape_during_a_burst_never_blocks_or_fails():
    """Scrapes interleaved with tasks (the engine's observers and the scrape-time
    gauges run concurrently with the work): every scrape parses."""
    async with serving(GatewayConfig(port=0, engine=TINY), InprocEngineClient(TINY)) as server:
        async with client(server) as c:
            tasks = [upscale_task(settings={"steps": 3}) for _ in range(6)]
            running = asyncio.ensure_future(c.run(tasks, timeout=120))
            while not running.done():
                samples = await scrape(server.port)
                assert value(samples, "latent_upscaler_connections", transport="websocket") == 1
                await asyncio.sleep(0.05)
            await running
        samples = await scrape(server.port)
    assert value(samples, "latent_upscaler_tasks_total", task_type="imageUpscale", outcome="success") == 6


def test_label_values_are_bounded():
    from gateway.metrics import Metrics

    metrics = Metrics(role="serve")
    for i in range(50):  # whatever a client sends, the labels stay in a small fixed set
        metrics.task_ended(f"made-up-{i}", f"bogus code {i}", deliver_async=False, seconds=None)
    samples = {k: v for k, v in _parse(metrics.render()).items() if k[0] == "latent_upscaler_tasks_total" and v}
    assert samples == {("latent_upscaler_tasks_total", (("outcome", "other"), ("task_type", "other"))): 50}


def _parse(text: bytes) -> dict:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text.decode())
        for s in f.samples
    }

