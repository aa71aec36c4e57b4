"""The async engine interface the gateway uses, with the real engine and the null one."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from engine.api import EngineError, ErrorCode, OutputFormat, Progress, UpscaleRequest, UpscaleResult
from engine.client import EngineOverloaded, EngineUnavailable, InprocEngineClient, NullEngineClient
from engine.config import EngineConfig
from tests.engine_helpers import make_png


async def collect(client, ids: set[str], timeout: float = 60.0) -> dict[str, list]:
    seen: dict[str, list] = {i: [] for i in ids}
    done: set[str] = set()

    async def read():
        async for out in client.outputs():
            seen[out.request_id].append(out)
            if not isinstance(out, Progress):
                done.add(out.request_id)
                if done == ids:
                    return

    await asyncio.wait_for(read(), timeout)
    return seen


async def test_inproc_client_round_trip_without_blocking_the_loop():
    client = InprocEngineClient(EngineConfig(model="tiny", device="cpu", dtype="fp32"))
    with pytest.raises(EngineUnavailable):
        client.submit(UpscaleRequest("early", make_png(64, 64)))
    await client.start()
    assert client.ready
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    tick_task = asyncio.create_task(ticker())
    try:
        client.submit(UpscaleRequest("a", make_png(40, 24), steps=3, want_progress=True))
        client.submit(UpscaleRequest("b", make_png(64, 64), steps=50, output_format=OutputFormat.WEBP))
        client.submit(UpscaleRequest("c", b"garbage"))
        seen = await collect(client, {"a", "c"})
        await client.abort(["b"])
        seen.update(await collect(client, {"b"}))
    finally:
        tick_task.cancel()
        await client.close()
    assert [p.step for p in seen["a"][:-1]] == [1, 2, 3]
    result = seen["a"][-1]
    assert isinstance(result, UpscaleResult) and (result.width, result.height) == (80, 48)
    assert Image.open(io.BytesIO(result.image)).format == "JPEG"
    assert result.engine_seconds > 0 and result.unet_calls == 3
    assert seen["b"][-1].code is ErrorCode.ABORTED
    assert isinstance(seen["c"][0], EngineError) and seen["c"][0].code is ErrorCode.INVALID_IMAGE
    assert ticks > 5  # the event loop kept running while the model worked
    assert not client.ready


async def test_null_client_answers_at_once_and_bounds_its_queue():
    client = NullEngineClient(max_queue=0)
    await client.start()
    with pytest.raises(EngineOverloaded):
        client.submit(UpscaleRequest("x", make_png(16, 16)))
    client = NullEngineClient()
    await client.start()
    client.submit(UpscaleRequest("x", make_png(16, 10), output_format=OutputFormat.PNG))
    seen = await collect(client, {"x"})
    assert (seen["x"][0].width, seen["x"][0].height) == (32, 20)
    await client.close()


async def kill_the_engine_loop(client: InprocEngineClient) -> None:
    """Inject a fault into the running engine loop while a request is in it: the loop
    dies and the request fails with internalError."""

    def explode():
        raise RuntimeError("injected loop fault")

    client._core.scheduler.schedule = explode
    client.submit(UpscaleRequest("doomed", make_png(64, 64), steps=2))
    seen = await collect(client, {"doomed"})
    assert seen["doomed"][-1].code is ErrorCode.INTERNAL


async def test_a_dead_engine_loop_fails_its_requests_and_restarts():
    client = InprocEngineClient(EngineConfig(model="tiny", device="cpu", dtype="fp32"))
    await client.start()
    core = client._core
    await kill_the_engine_loop(client)
    for _ in range(200):
        if client.ready and client._core is not core:
            break
        await asyncio.sleep(0.01)
    assert client.ready and client.restart_count == 1
    client.submit(UpscaleRequest("after", make_png(64, 64), steps=2))
    seen = await collect(client, {"after"})
    assert isinstance(seen["after"][-1], UpscaleResult)
    await client.close()


async def test_no_restart_while_a_thread_of_the_dead_engine_still_runs(caplog):
    """Two engines must never share the loaded model: if the dead one's threads cannot
    be joined, the client stays down and says so."""
    client = InprocEngineClient(EngineConfig(model="tiny", device="cpu", dtype="fp32"))
    await client.start()
    core = client._core
    shutdown = core.shutdown
    core.shutdown = lambda timeout=30.0: shutdown(0.0) and False  # as if a thread outlived the join
    await kill_the_engine_loop(client)
    for _ in range(200):
        if "not restarting" in caplog.text:
            break
        await asyncio.sleep(0.01)
    assert "not restarting" in caplog.text
    assert client._core is core and not client.ready and client.restart_count == 1
    with pytest.raises(EngineUnavailable):
        client.submit(UpscaleRequest("after", make_png(64, 64), steps=2))
    core.shutdown = shutdown
    await client.close()
