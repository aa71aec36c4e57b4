"""The gateway with the real engine (tiny model, CPU): sizes, streaming order, session
resume, progress and cost."""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import pytest
from PIL import Image

from engine.client import InprocEngineClient
from gateway.config import GatewayConfig
from tests.conftest import (
    TINY,
    FakeClock,
    client,
    data_uri,
    decode_result_image,
    png_bytes,
    serving,
    upscale_task,
)


@pytest.fixture
async def tiny_server():
    clock = FakeClock()
    config = GatewayConfig(port=0, max_in_flight_per_connection=128, engine=TINY)
    async with serving(config, InprocEngineClient(TINY), clock=clock) as server:
        server.clock = clock
        yield server


@pytest.mark.parametrize("output_type", ["base64Data", "dataURI", "URL"])
async def test_any_size_comes_back_exactly_twice(tiny_server, output_type):
    async with client(tiny_server) as c:
        tasks = [
            upscale_task(data_uri(png_bytes(37, 53)), outputType=output_type, outputFormat=fmt)
            for fmt in ("JPG", "PNG", "WEBP")
        ]
        seen = await c.run(tasks)
    for task in tasks:
        item = seen[task["taskUUID"]][-1]
        assert item["status"] == "success", item
        if output_type == "URL":
            async with httpx.AsyncClient() as http:
                response = await http.get(item["imageURL"])
            assert response.status_code == 200
            image = Image.open(io.BytesIO(response.content))
        else:
            image = decode_result_image(item)
        assert image.size == (74, 106)
        assert image.format == {"JPG": "JPEG"}.get(task["outputFormat"], task["outputFormat"])


async def test_results_stream_as_they_finish_not_in_request_order(tiny_server):
    slow = [upscale_task(data_uri(png_bytes(128, 128, (i, 9, 9))), settings={"steps": 12}) for i in range(3)]
    fast = [upscale_task(data_uri(png_bytes(64, 64, (9, i, 9))), settings={"steps": 2}) for i in range(3)]
    async with client(tiny_server) as c:
        seen = await c.run(slow + fast, timeout=120)
        order = c.order
    assert all(seen[t["taskUUID"]][-1]["status"] == "success" for t in slow + fast)
    assert set(order[:3]) == {t["taskUUID"] for t in fast}


async def test_a_hundred_mixed_tasks_each_answered_exactly_once(tiny_server):
    sizes = [(64, 64), (96, 64), (40, 24)]
    tasks = [
        upscale_task(
            data_uri(png_bytes(*sizes[i % 3], (i, i, i))),
            settings={"steps": 1 + i % 4, "CFGScale": 7.5 * (i % 2)},
        )
        for i in range(100)
    ]
    async with client(tiny_server) as c:
        seen = await c.run(tasks, timeout=300)
        assert await c.quiet(0.5) == []
        order = c.order
    assert all(len(seen[t["taskUUID"]]) == 1 and seen[t["taskUUID"]][0]["status"] == "success" for t in tasks)
    assert order != [t["taskUUID"] for t in tasks]


async def test_a_dropped_client_resumes_its_session_and_gets_missed_results_once(tiny_server):
    task = upscale_task(data_uri(png_bytes(64, 64)), settings={"steps": 8})
    async with client(tiny_server, key=None) as c:
        session = await c.auth("k1")
        await c.send([task])
    record = None
    for _ in range(600):  # the task finishes while nobody is connected
        record = tiny_server.gateway.sessions.lookup("k1", task["taskUUID"])
        if record is not None and record.finished:
            break
        await asyncio.sleep(0.05)
    assert record is not None and record.finished
    async with client(tiny_server, key=None) as c:
        assert await c.auth("k1", session) == session
        item = (await c.recv())["data"][0]
        assert item["taskUUID"] == task["taskUUID"] and item["status"] == "success"
        assert await c.quiet() == []
    async with client(tiny_server, key=None) as c:  # each result is replayed once only
        await c.auth("k1", session)
        assert await c.quiet() == []


async def test_missed_results_are_gone_after_the_session_ttl(tiny_server):
    task = upscale_task(data_uri(png_bytes(64, 64)), settings={"steps": 3})
    async with client(tiny_server, key=None) as c:
        session = await c.auth("k2")
        await c.send([task])
    for _ in range(600):
        record = tiny_server.gateway.sessions.lookup("k2", task["taskUUID"])
        if record is not None and record.finished:
            break
        await asyncio.sleep(0.05)
    tiny_server.clock.advance(121)
    async with client(tiny_server, key=None) as c:
        assert await c.auth("k2", session) != session  # a fresh session
        assert await c.quiet() == []
    async with client(tiny_server, key=None) as c:  # another key never gets them either
        assert await c.auth("k3", session) != session


async def test_progress_only_when_asked_and_in_order(tiny_server):
    asked = upscale_task(data_uri(png_bytes(64, 64)), includeProgress=True, settings={"steps": 4})
    silent = upscale_task(data_uri(png_bytes(64, 64)), settings={"steps": 4})
    async with client(tiny_server) as c:
        seen = await c.run([asked, silent])
    progress = [i["progress"] for i in seen[asked["taskUUID"]] if i.get("status") == "processing"]
    assert progress == sorted(progress) and progress[-1] <= 100 and len(progress) == 4
    assert seen[asked["taskUUID"]][-1]["status"] == "success"
    for item in seen[asked["taskUUID"]][:-1]:
        assert not any(k.endswith(("URL", "Base64Data", "DataURI")) for k in item)
    assert [i["status"] for i in seen[silent["taskUUID"]]] == ["success"]


async def test_cost_is_smaller_for_a_task_that_shared_its_steps(tiny_server):
    def task():
        return upscale_task(data_uri(png_bytes(64, 64)), includeCost=True, settings={"steps": 10, "seed": 1})

    async with client(tiny_server) as c:
        alone = task()
        alone_cost = (await c.run([alone]))[alone["taskUUID"]][-1]["cost"]
        shared = [task() for _ in range(8)]
        seen = await c.run(shared)
    shared_costs = [seen[t["taskUUID"]][-1]["cost"] for t in shared]
    assert alone_cost > 0 and all(c > 0 for c in shared_costs)
    assert sum(shared_costs) / len(shared_costs) < alone_cost


async def test_readiness_follows_the_engine(tiny_server):
    assert tiny_server.gateway.ready
    started = time.monotonic()
    await tiny_server.gateway.engine.close()
    assert not tiny_server.gateway.ready and time.monotonic() - started < 30
