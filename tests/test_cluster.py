"""Cluster mode with real processes: ``redis-server``, gateways and workers (tiny model).

Each test starts what it needs on free ports and stops it by PID; faults are real
signals. Without ``redis-server`` these tests skip locally (saying how to install it)
and fail in CI (``CI=true``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import signal
import time
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image
from websockets.asyncio.client import connect

from engine.client import InprocEngineClient
from gateway.cluster import keys
from gateway.cluster.link import cancel_all
from gateway.cluster.scripts import INLINE_IMAGE_BYTES
from tests.cluster_harness import INSTALL_HINT, REDIS_SERVER, Cluster, RedisProcess
from tests.conftest import TINY, Client, data_uri, png_bytes, serving, upscale_task

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if REDIS_SERVER is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"redis-server is missing in CI; {INSTALL_HINT}")
        pytest.skip(f"redis-server is not installed; {INSTALL_HINT}")
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def cluster(redis_server, tmp_path):
    redis_server.flush()
    made = Cluster(redis_server, tmp_path, common=["--claim-timeout", "2", "--shutdown-grace", "3"])
    yield made
    killed = made.close()
    print(made.logs())  # shown when the test failed
    assert not killed, f"did not exit on SIGTERM within 15 s: {killed}"


@contextlib.asynccontextmanager
async def connected(url: str, session: str | None = None, key: str = "test-key"):
    async with connect(url, max_size=64 * 2**20) as ws:
        c = Client(ws)
        c.session = await c.auth(key, session)
        yield c


def terminal(items: list[dict]) -> list[dict]:
    return [i for i in items if i.get("status") != "processing"]


async def poll(c: Client, task_uuid: str, timeout: float = 60) -> dict:
    """getResponse until the task is finished; its item (or error)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await c.send([{"taskType": "getResponse", "taskUUID": task_uuid}])
        frame = await c.recv()
        item = (frame.get("data") or frame.get("errors"))[0]
        if item.get("status") != "processing":
            return item
        await asyncio.sleep(0.2)
    raise AssertionError(f"{task_uuid} not finished in {timeout} s")


def noise_png(width: int, height: int) -> bytes:
    """A PNG that does not compress: larger than a script inlines (``INLINE_IMAGE_BYTES``)."""
    noise = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    assert len(buf.getvalue()) > INLINE_IMAGE_BYTES
    return buf.getvalue()


def pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["imageBase64Data"]))).convert("RGB")).astype(int)


async def wait_for(condition, timeout: float = 30, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(every)


async def test_two_gateways_two_workers_answer_a_mixed_burst_once_like_serve(cluster):
    a, b = cluster.gateway("a"), cluster.gateway("b")
    w1, w2 = cluster.worker("w1"), cluster.worker("w2")
    await cluster.ready(a, b, w1, w2)
    assert all("event loop: uvloop" in role.log.read_text() for role in (a, b, w1, w2))  # the default
    sizes = [(40, 24), (64, 64), (48, 32)]
    tasks = [
        upscale_task(
            data_uri(png_bytes(*sizes[i % 3], color=(30 * i % 255, 90, 160))),
            settings={"steps": 2 + i % 3, "seed": 1000 + i, "CFGScale": 7.5 if i % 4 == 0 else 1.0},
            taskType="upscale" if i % 2 else "imageUpscale",
        )
        for i in range(12)
    ]
    # An input too large to come with its task through a script: its worker reads it.
    tasks.append(upscale_task(data_uri(noise_png(160, 160)), settings={"steps": 2, "seed": 5}))
    later = upscale_task(deliveryMethod="async", settings={"seed": 77})
    async with connected(a.url) as c1, connected(a.url) as c2, connected(b.url) as c3:
        results = await asyncio.gather(c1.run(tasks[:4]), c2.run(tasks[4:8]), c3.run(tasks[8:]))
        await c1.send([later])
        assert (await c1.recv())["data"][0]["taskUUID"] == later["taskUUID"]
        polled = await poll(c3, later["taskUUID"])  # on the other gateway
        for c in (c1, c2, c3):
            assert await c.quiet(0.5) == []  # nothing more: each task answered once
    got = {u: terminal(items) for r in results for u, items in r.items()}
    assert all(len(items) == 1 and items[0]["status"] == "success" for items in got.values()), got
    assert polled["status"] == "success"
    for t in tasks:
        assert got[t["taskUUID"]][0]["taskType"] == t["taskType"]
    stats = [await w.stats() for w in (w1, w2)]
    assert sum(s["engine"]["succeeded"] for s in stats) == len(tasks) + 1
    assert sum(s["inputs_read"] for s in stats) == 1  # the large one; the others came with their tasks
    # The same tasks, same seeds, in one process (serve): the same images.
    async with serving(engine=InprocEngineClient(TINY)) as server, connected(server.url) as c:
        again = [{**t, "taskUUID": str(uuid.uuid4())} for t in tasks]
        alone = await c.run(again, timeout=120)
    for t, u in zip(tasks, again):
        ours, theirs = pixels(got[t["taskUUID"]][0]), pixels(alone[u["taskUUID"]][-1])
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 2, t["taskUUID"]


async def test_a_killed_workers_tasks_run_elsewhere_once(cluster):
    gw = cluster.gateway("gw")
    w1 = cluster.worker("w1", "--max-batch-rows", "4")
    w2 = cluster.worker("w2", "--max-batch-rows", "4")
    await cluster.ready(gw, w1, w2)
    tasks = [upscale_task(settings={"steps": 12 + 4 * (i % 3)}) for i in range(12)]

    async def holding() -> tuple | None:
        for victim, other in ((w1, w2), (w2, w1)):
            engine = (await victim.stats())["engine"]
            if engine["denoising"] and (engine["waiting"] or engine["decoding"] or engine["denoising"] >= 2):
                return victim, other
        return None

    async with connected(gw.url) as c:
        await c.send(tasks)
        victim, other = await wait_for(holding, every=0.02)
        victim.signal(signal.SIGKILL)
        results = await c.collect({t["taskUUID"] for t in tasks}, timeout=120)
        assert await c.quiet(1.0) == []
    assert all(len(terminal(items)) == 1 and items[-1]["status"] == "success" for items in results.values())
    assert (await other.stats())["redelivered"] > 0


async def test_a_task_that_keeps_killing_its_workers_ends_with_an_error(cluster):
    gw = cluster.gateway("gw", "--max-deliveries", "2")
    task = upscale_task(settings={"steps": 100})
    async with connected((await gw.wait_ready()).url) as c:
        await c.send([task])
        for n in range(2):  # each worker that takes the task dies holding it
            worker = cluster.worker(f"w{n}", "--max-deliveries", "2")
            await worker.wait_ready()
            await wait_for(lambda w=worker: _holds(w), every=0.05)
            worker.signal(signal.SIGKILL)
        last = cluster.worker("w-last", "--max-deliveries", "2")
        items = await c.collect({task["taskUUID"]}, timeout=60)
    error = terminal(items[task["taskUUID"]])[0]
    assert error["code"] == "taskRetriesExhausted" and error["taskUUID"] == task["taskUUID"], error
    assert "2 deliveries" in error["message"]
    assert (await last.stats())["dead_lettered"] == 1


async def _holds(worker) -> bool:
    return (await worker.stats())["held"] > 0


async def test_a_stalled_workers_late_results_are_dropped(cluster):
    gw = cluster.gateway("gw")
    w1, w2 = cluster.worker("w1"), cluster.worker("w2")
    await cluster.ready(gw, w1, w2)
    tasks = [upscale_task(settings={"steps": 30}) for _ in range(4)]
    async with connected(gw.url) as c:
        await c.send(tasks)

        async def stalled():
            for victim, other in ((w1, w2), (w2, w1)):
                if (await victim.stats())["engine"]["denoising"]:
                    return victim, other
            return None

        victim, other = await wait_for(stalled, every=0.02)
        held = (await victim.stats())["held"]
        victim.signal(signal.SIGSTOP)  # past the claim timeout (2 s): its tasks go to the other
        results = await c.collect({t["taskUUID"] for t in tasks}, timeout=120)
        victim.signal(signal.SIGCONT)  # it wakes up and finishes what it held: fenced
        await asyncio.sleep(3)
        assert await c.quiet(1.0) == []
    assert all(len(terminal(items)) == 1 and items[-1]["status"] == "success" for items in results.values())
    assert (await other.stats())["redelivered"] >= held > 0


async def test_a_killed_gateways_sessions_resume_elsewhere_and_webhooks_still_go(cluster, redis_server, local_http):
    a = cluster.gateway("a", "--allow-private-networks")
    b = cluster.gateway("b", "--allow-private-networks")
    w = cluster.worker("w", "--max-batch-rows", "4")
    await cluster.ready(a, b, w)
    quick = [upscale_task(settings={"steps": 2}) for _ in range(2)]
    # Large outputs (base64) go through Redis without their payload; the gateway that
    # sends the frame (replayed here, after the resume) or posts the webhook puts it back.
    big = data_uri(noise_png(160, 160))
    slow = [upscale_task(big if i == 0 else None, settings={"steps": 25}) for i in range(6)]
    hooked = upscale_task(big, settings={"steps": 25}, webhookURL=local_http.url + "/hook")
    later = upscale_task(deliveryMethod="async", settings={"steps": 25})
    every = {t["taskUUID"] for t in [*quick, *slow, hooked]}
    async with connected(a.url) as c:
        session = c.session
        await c.send([*quick, *slow, hooked, later])
        first = await c.collect({t["taskUUID"] for t in quick}, timeout=60)  # finished before the kill
        a.signal(signal.SIGKILL)
    await asyncio.sleep(1.5)  # some finish while nobody holds the session
    async with connected(b.url, session) as c:
        assert c.session == session
        rest = await c.collect(every - set(first), timeout=120)
        polled = await poll(c, later["taskUUID"])
        assert await c.quiet(1.0) == []
    seen = {u: items for u, items in {**first, **rest}.items() if u != later["taskUUID"]}  # (its ack)
    assert set(seen) == every
    assert all(len(terminal(items)) == 1 and items[-1]["status"] == "success" for items in seen.values())
    assert polled["status"] == "success"
    assert not any("_payload" in item for items in seen.values() for item in items)
    # (the outbox keeps the frames: the two large payloads, 400 KB each in base64, are not in it)
    used = redis_server.command(b"MEMORY", b"USAGE", keys.outbox(session).encode(), b"SAMPLES", b"0")
    assert used is not None and int(used[1:]) < 400_000, used
    for task in (slow[0], hooked):
        assert pixels(terminal(seen[task["taskUUID"]])[0]).shape == (320, 320, 3)
    await wait_for(lambda: _posted(local_http, hooked["taskUUID"]), timeout=30)
    body = await _posted(local_http, hooked["taskUUID"])
    assert b'"imageBase64Data"' in body and b"_payload" not in body


async def test_a_large_result_that_finished_while_detached_is_replayed_whole(cluster):
    """A frame kept without its image payload (over 64 KB) is whole again when a resume
    replays it (``OPEN``'s ``TAKE``), not only when a gateway pops its notice."""
    gw = cluster.gateway("gw")
    w = cluster.worker("w")
    await cluster.ready(gw, w)
    task = upscale_task(data_uri(noise_png(160, 160)), settings={"steps": 8})
    async with connected(gw.url) as c:
        session = c.session
        await c.send([task])
    # The socket is gone (the session detached) before the task finishes.

    async def finished() -> bool:
        return (await w.stats())["engine"]["succeeded"] == 1

    await wait_for(finished, timeout=120)
    async with connected(gw.url, session) as c:
        assert c.session == session
        got = await c.collect({task["taskUUID"]}, timeout=30)
        assert await c.quiet(0.5) == []
    item = terminal(got[task["taskUUID"]])[0]
    assert "_payload" not in item and pixels(item).shape == (320, 320, 3)


async def _posted(local_http, task_uuid: str) -> bytes | None:
    bodies = [body for _, path, _, body in local_http.received if path == "/hook" and task_uuid.encode() in body]
    return bodies[0] if bodies else None


async def test_images_and_uploads_work_on_every_gateway(cluster):
    a, b = cluster.gateway("a"), cluster.gateway("b")
    w = cluster.worker("w")
    await cluster.ready(a, b, w)
    upload = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": data_uri(png_bytes(40, 24))}
    async with connected(a.url) as ca, connected(b.url) as cb:
        await ca.send([upload])
        uploaded = (await ca.recv())["data"][0]
        task = upscale_task(uploaded["imageUUID"], outputType="URL")
        item = (await cb.run([task]))[task["taskUUID"]][-1]
        assert item["status"] == "success" and item["inputImageUUID"] == uploaded["imageUUID"]
        reuse = upscale_task(item["imageUUID"])  # an output as an input, on the other gateway
        again = (await ca.run([reuse]))[reuse["taskUUID"]][-1]
        assert again["status"] == "success"
    async with httpx.AsyncClient() as http:
        for gateway in (a, b):
            path = item["imageURL"].split("/images/", 1)[1]
            got = await http.get(f"{gateway.http}/images/{path}")
            assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).size == (80, 48)
            got = await http.get(uploaded["imageURL"].replace(a.http, gateway.http))
            assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).size == (40, 24)


async def test_one_task_uuid_on_two_gateways_runs_once(cluster):
    a, b = cluster.gateway("a"), cluster.gateway("b")
    w = cluster.worker("w")
    await cluster.ready(a, b, w)
    task = upscale_task(settings={"steps": 4})
    async with connected(a.url) as ca, connected(b.url) as cb:
        await asyncio.gather(ca.send([task]), cb.send([task]))
        answers = [await ca.collect({task["taskUUID"]}), await cb.collect({task["taskUUID"]})]
    finals = sorted((terminal(x[task["taskUUID"]])[0] for x in answers), key=lambda i: "code" in i)
    assert finals[0]["status"] == "success" and finals[1]["code"] == "conflictTaskUUID", finals
    assert (await w.stats())["engine"]["succeeded"] == 1


async def test_backpressure_is_global(cluster):
    a = cluster.gateway("a", "--max-queued", "3")
    b = cluster.gateway("b", "--max-queued", "3")
    await cluster.ready(a, b)  # no worker yet: nothing leaves the queue
    tasks = [upscale_task() for _ in range(5)]
    async with connected(a.url) as ca, connected(b.url) as cb:
        await ca.send(tasks[:2])
        await wait_for(lambda: _queued(cluster.redis, 2))
        await cb.send(tasks[2:])
        refused = await cb.collect({t["taskUUID"] for t in tasks[3:]}, timeout=10)
        assert all(terminal(i)[0]["code"] == "rateLimitExceeded" for i in refused.values()), refused
        cluster.worker("w")  # capacity arrives: the three queued tasks run
        done_a = await ca.collect({t["taskUUID"] for t in tasks[:2]}, timeout=90)
        done_b = await cb.collect({tasks[2]["taskUUID"]}, timeout=30)
    assert all(terminal(i)[0]["status"] == "success" for i in [*done_a.values(), *done_b.values()])


async def _queued(redis: RedisProcess, count: int) -> bool:
    """Whether the cluster's queues hold ``count`` entries."""
    script = b"local n = 0 for _, s in ipairs(redis.call('SMEMBERS', 'lu:shapes')) do "
    script += b"n = n + redis.call('XLEN', 'lu:q:{' .. s .. '}') end return n"
    return redis.command(b"EVAL", script, b"0") == b":%d" % count


async def test_redis_going_away_ends_tasks_with_an_error_and_both_roles_carry_on(tmp_path):
    if REDIS_SERVER is None:
        pytest.skip(f"redis-server is not installed; {INSTALL_HINT}")
    redis = RedisProcess(tmp_path).start()
    cluster = Cluster(redis, tmp_path, common=["--claim-timeout", "2", "--shutdown-grace", "3"])
    try:
        gw, w = cluster.gateway("gw"), cluster.worker("w", "--max-batch-rows", "2")
        await cluster.ready(gw, w)
        tasks = [upscale_task(settings={"steps": 60}) for _ in range(4)]
        async with connected(gw.url) as c:
            await c.send(tasks)
            await wait_for(lambda: _holds(w), every=0.05)
            redis.stop()
            started = time.monotonic()
            ended = await c.collect({t["taskUUID"] for t in tasks}, timeout=30)
            waited = time.monotonic() - started
            codes = {terminal(i)[0].get("code") for i in ended.values()}
            assert codes <= {"serviceUnavailable", "taskLost"} and codes, ended
            assert not await gw.ready() and not await w.ready()
            redis.start()  # back, and empty
            await cluster.ready(gw, w, timeout=30)
            again = upscale_task()
            item = (await c.run([again], timeout=60))[again["taskUUID"]][-1]
            assert item["status"] == "success", item
        print(f"tasks ended {waited:.1f} s after Redis went away")
    finally:
        killed = cluster.close()
        redis.stop()
        print(cluster.logs())
    assert not killed, f"did not exit on SIGTERM within 15 s: {killed}"


async def test_workers_pull_by_capacity_and_fill_their_batches(cluster):
    gw = cluster.gateway("gw")
    w1 = cluster.worker("w1", "--max-batch-rows", "4")
    w2 = cluster.worker("w2", "--max-batch-rows", "4")
    await cluster.ready(gw, w1, w2)
    # One shape, no guidance. The engine may encode a burst's inputs in two VAE batches
    # (the second joins the UNet a tick later): enough steps that such a ramp costs < 10 %.
    tasks = [upscale_task(settings={"steps": 40}) for _ in range(8)]
    async with connected(gw.url) as c:
        results = await c.run(tasks, timeout=120)
    assert all(terminal(items)[0]["status"] == "success" for items in results.values())
    for worker in (w1, w2):
        engine = (await worker.stats())["engine"]
        assert engine["succeeded"] >= 0.4 * len(tasks), engine
        assert engine["mean_rows"] >= 0.9 * 4, engine


async def test_an_idle_worker_is_handed_its_task_without_pulling(cluster, redis_server):
    """At light load a gateway hands each task to an idle worker in the enqueue itself
    (the worker's inbox); the worker then pulls more of the same shape by capacity."""
    gw = cluster.gateway("gw")
    w1 = cluster.worker("w1", "--max-batch-rows", "4")
    await cluster.ready(gw, w1)

    async def idle() -> bool:
        return redis_server.command(b"ZSCORE", b"lu:idle", b"w1") not in (None, b"$-1")

    async with connected(gw.url) as c:
        assert redis_server.command(b"CONFIG", b"RESETSTAT") == b"+OK"
        for n in range(3):  # one at a time: each is pushed (the first with an input too large to inline)
            await wait_for(idle)
            image = data_uri(noise_png(160, 160) if n == 0 else png_bytes(40, 24))
            results = await c.run([upscale_task(image, settings={"steps": 2, "seed": n})])
            assert [terminal(items)[0]["status"] for items in results.values()] == ["success"]
            # The result's notice told the gateway that the task is done (no message):
            # it no longer counts it (settled in the turn that sent the result).
            counts = (await gw.stats())["gateway"]
            assert (counts["tasks_in_flight"], counts["engine_tasks"]) == (0, 0), counts
        assert redis_server.calls("PUBLISH") == 0  # (and no work hint: each was pushed)
        assert (await w1.stats())["pushed"] == 3
        assert (await w1.stats())["inputs_read"] == 1  # the large one
        await wait_for(idle)
        burst = [upscale_task(settings={"steps": 6}) for _ in range(6)]
        results = await c.run(burst, timeout=120)  # one pushed, the rest pulled
        assert await c.quiet(0.5) == []
    assert all(len(terminal(items)) == 1 and terminal(items)[0]["status"] == "success" for items in results.values())
    stats = await w1.stats()
    assert stats["pushed"] == 4 and stats["engine"]["succeeded"] == 9, stats
    # The pushed entries carry input images: once read, the worker's next pull trims them.

    async def trimmed() -> bool:
        return redis_server.command(b"XLEN", b"lu:inbox:{w1}") == b":0"

    await wait_for(trimmed)


async def test_a_worker_restarted_under_its_own_id_takes_back_its_tasks(cluster):
    """A worker killed and started again with the same ``--worker-id`` (as an
    orchestrator's stable names do) keeps its liveness key alive, so nobody else would
    ever claim what it held: it begins those tasks again itself."""
    gw = cluster.gateway("gw")
    slow_claims = ["--max-batch-rows", "4", "--claim-timeout", "30"]  # no reaping within this test
    w1 = cluster.worker("w1", *slow_claims)
    await cluster.ready(gw, w1)
    tasks = [upscale_task(settings={"steps": 30}) for _ in range(4)]
    async with connected(gw.url) as c:
        await c.send(tasks)
        await wait_for(lambda: _holds(w1), every=0.05)
        w1.signal(signal.SIGKILL)
        again = cluster.worker("w1", *slow_claims)
        results = await c.collect({t["taskUUID"] for t in tasks}, timeout=25)
        assert await c.quiet(0.5) == []
    assert all(len(terminal(items)) == 1 and items[-1]["status"] == "success" for items in results.values())
    assert (await again.stats())["redelivered"] > 0


async def test_rest_on_cluster_gateways_with_retries_across_them(cluster):
    """REST (POST /v1) on a cluster gateway: a sync task waits for the worker's result;
    the same task re-POSTed to the other gateway attaches to it (its result, not a
    second run); another key's retry conflicts; async + getResponse work across gateways."""
    a, b = cluster.gateway("a"), cluster.gateway("b")
    w = cluster.worker("w")
    await cluster.ready(a, b, w)
    headers = {"Authorization": "Bearer test-key"}
    task = upscale_task(settings={"steps": 3, "seed": 11})
    later = upscale_task(deliveryMethod="async")
    async with httpx.AsyncClient(timeout=60) as http:
        first = await http.post(a.rest, json=[task], headers=headers)
        assert first.status_code == 200, first.text
        item = first.json()["data"][0]
        again = await http.post(b.rest, json=[task], headers=headers)
        assert again.status_code == 200 and again.json()["data"][0]["imageUUID"] == item["imageUUID"]
        other = await http.post(b.rest, json=[task], headers={"Authorization": "Bearer another-key"})
        assert other.status_code == 409 and other.json()["errors"][0]["code"] == "conflictTaskUUID"
        ack = await http.post(b.rest, json=[later], headers=headers)
        assert ack.status_code == 200 and ack.json()["data"][0]["taskUUID"] == later["taskUUID"]

        async def done():
            polled = await http.post(
                a.rest, json=[{"taskType": "getResponse", "taskUUID": later["taskUUID"]}], headers=headers
            )
            return polled.json()["data"][0]["status"] == "success" and polled

        assert await wait_for(done, timeout=60, every=0.3)
    assert (await w.stats())["engine"]["succeeded"] == 2  # the retry ran nothing


async def test_cancel_all_ends_a_task_that_swallows_its_first_cancellation():
    # What redis-py does when a cancellation lands between a command's send and its answer.
    cancelled = 0

    async def stubborn() -> None:
        nonlocal cancelled
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled += 1
                if cancelled > 1:
                    raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_all([task]), timeout=5)
    assert task.cancelled() and cancelled == 2
