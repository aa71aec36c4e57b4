"""Images in S3-compatible object storage, against a real S3 API: moto's server mode as a
process on 127.0.0.1 (``tests/s3_harness.py``), stopped by its PID.

Without moto these tests skip locally (saying how to install it) and fail in CI
(``CI=true``). Each test uses a bucket of its own; TTLs are short where the store and
its index are tested directly, and the gateway's ``output_ttl`` is set low in-process
for the one end-to-end expiry (the wire's ``ttl`` is at least 60 s).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import time
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image

from engine.client import NullEngineClient
from gateway.config import GatewayConfig, ImageStoreConfig
from gateway.objectstore import MemoryExpiryIndex, S3ImageStore
from tests.conftest import client, data_uri, png_bytes, serving, upscale_task
from tests.s3_harness import CREDENTIALS, INSTALL_HINT, MOTO_INSTALLED, MotoServer


def _require_moto() -> None:
    if not MOTO_INSTALLED:
        if os.environ.get("CI") == "true":
            pytest.fail(f"moto's server mode is missing in CI; {INSTALL_HINT}")
        pytest.skip(f"moto's server mode is not installed; {INSTALL_HINT}")


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    _require_moto()
    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture
def aws_env(monkeypatch):
    """The AWS variables the gateway (and its subprocesses) sign with; nothing else of AWS."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")


@pytest.fixture
def bucket(moto, aws_env) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(name)
    return name


def s3_config(moto: MotoServer, bucket: str, **options) -> ImageStoreConfig:
    return ImageStoreConfig("s3", bucket, "img", endpoint_url=moto.url, **options)


def noisy_png(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG that does not compress (random pixels): ``width × height × 3`` bytes or so."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def object_url(moto: MotoServer, bucket: str, image_uuid: str) -> str:
    return f"{moto.url}/{bucket}/img/{image_uuid}"


async def stored_object(moto: MotoServer, bucket: str, image_uuid: str) -> dict | None:
    """The object as S3 has it, or None."""
    return await asyncio.to_thread(moto.object, bucket, f"img/{image_uuid}")


def s3_gateway(moto: MotoServer, bucket: str, **overrides) -> GatewayConfig:
    store = s3_config(moto, bucket, **overrides.pop("store", {}))
    return GatewayConfig(port=0, image_store=store, **overrides)


# Every image kind, through serve


async def test_every_image_kind_goes_to_s3_with_its_media_type_and_comes_back(moto, bucket, local_http):
    """imageUpload, an inline input, a URL input, and outputs of every outputType (and
    format), stored in S3 and read back: by UUID as inputs, by getResponse, by GET."""
    local_http.files["/in.png"] = (png_bytes(24, 16, color=(10, 200, 10)), "image/png")
    config = s3_gateway(moto, bucket, allow_private_networks=True)  # (the URL input is on 127.0.0.1)
    async with serving(config, NullEngineClient()) as server, client(server) as c:
        upload = {
            "taskType": "imageUpload",
            "taskUUID": str(uuid.uuid4()),
            "image": data_uri(png_bytes(40, 24)),
        }
        uploaded = (await c.run([upload]))[upload["taskUUID"]][-1]
        tasks = [
            upscale_task(uploaded["imageUUID"], outputType="URL", outputFormat="JPG"),
            upscale_task(data_uri(png_bytes(32, 32)), outputType="dataURI", outputFormat="WEBP"),
            upscale_task(local_http.url + "/in.png", outputType="base64Data", outputFormat="PNG"),
            upscale_task(data_uri(png_bytes(16, 24)), deliveryMethod="async", outputType="base64Data"),
        ]
        results = await c.run(tasks[:3])
        items = [results[t["taskUUID"]][-1] for t in tasks[:3]]
        assert all(i["status"] == "success" for i in items), items
        await c.send(tasks[3:])
        await c.recv()  # its acknowledgement
        polled = await _poll(c, tasks[3]["taskUUID"])
        reuse = upscale_task(items[2]["imageUUID"])  # an output as the next input
        again = (await c.run([reuse]))[reuse["taskUUID"]][-1]
        assert again["status"] == "success" and again["inputImageUUID"] == items[2]["imageUUID"]
        # The payload of an async base64 task comes back from S3 for getResponse.
        assert Image.open(io.BytesIO(base64.b64decode(polled["imageBase64Data"]))).size == (32, 48)
    expected = {
        uploaded["imageUUID"]: "image/png",
        items[0]["inputImageUUID"]: "image/png",
        items[0]["imageUUID"]: "image/jpeg",
        items[1]["inputImageUUID"]: "image/png",
        items[1]["imageUUID"]: "image/webp",
        items[2]["inputImageUUID"]: "image/png",
        items[2]["imageUUID"]: "image/png",
        polled["imageUUID"]: "image/png",
    }
    assert items[0]["inputImageUUID"] == uploaded["imageUUID"]
    for image_uuid, media_type in expected.items():
        stored = await stored_object(moto, bucket, image_uuid)
        assert stored is not None, image_uuid
        assert stored["ContentType"] == media_type
        assert float(stored["Metadata"]["expires-at"]) > time.time() + 3000  # the default 1 h
    output = await stored_object(moto, bucket, items[1]["imageUUID"])
    assert Image.open(io.BytesIO(output["Body"])).size == (64, 64)
    url_input = await stored_object(moto, bucket, items[2]["inputImageUUID"])
    assert url_input["Body"] == local_http.files["/in.png"][0]


async def test_get_images_serves_from_s3_streaming_large_ones(moto, bucket):
    """GET /images/… on the WebSocket port: small and large images (a large one reaches
    the route as a stream and this port reads it whole, within its budget)."""
    large, small = noisy_png(400, 300), png_bytes(20, 20)
    assert len(large) > 256 * 1024
    async with serving(s3_gateway(moto, bucket), NullEngineClient()) as server:
        store = server.gateway.store
        big = await store.put(large, "image/png", 60)
        little = await store.put(small, "image/png", 60)
        answer = await server.routes.get(f"/images/{big.image_uuid}.png")
        assert answer.status == 200 and answer.body == b"" and answer.stream is not None
        assert answer.stream.length == len(large) and answer.length == len(large)
        assert await answer.stream.read_all() == large
        assert (await server.routes.get(f"/images/{little.image_uuid}.png")).body == small
        async with httpx.AsyncClient() as http:
            base = f"http://127.0.0.1:{server.port}/images"
            got = await http.get(f"{base}/{big.image_uuid}.png")
            assert got.status_code == 200 and got.content == large
            assert got.headers["content-type"] == "image/png"
            assert got.headers["cache-control"].startswith("public, max-age=")
            assert (await http.get(f"{base}/{little.image_uuid}.png")).content == small
            assert (await http.get(f"{base}/{uuid.uuid4()}.png")).status_code == 404
            assert (await http.get(f"{base}/..%2F..%2Fetc.png")).status_code == 404
        assert server.whole_bodies.used == 0


async def test_the_rest_port_streams_large_images_and_a_store_failing_mid_way_cuts_the_body(moto, bucket):
    """On the REST (aiohttp) port a large image is sent as it arrives from S3: HEAD has
    its length and no body, GET its bytes; when the store stops answering mid-body the
    connection is dropped (the client sees a short body, never a wrong one)."""
    large = os.urandom(24 * 2**20)  # more than the sockets between moto, gateway and client buffer
    config = s3_gateway(moto, bucket, http_port=0, store={"timeout": 1.5})
    async with serving(config, NullEngineClient()) as server:
        image = await server.gateway.store.put(large, "image/png", 60)
        page = f"http://127.0.0.1:{server.config.http_port}/images/{image.image_uuid}.png"
        async with httpx.AsyncClient(timeout=20) as http:
            head = await http.head(page)
            assert head.status_code == 200 and head.headers["content-length"] == str(len(large))
            assert head.content == b""
            got = await http.get(page)
            assert got.status_code == 200 and got.content == large
            assert got.headers["content-type"] == "image/png"
            received = 0
            try:
                with pytest.raises(httpx.RemoteProtocolError):
                    async with http.stream("GET", page) as response:
                        assert response.status_code == 200
                        async for chunk in response.aiter_bytes():
                            if received == 0:
                                moto.proc.send_signal(signal.SIGSTOP)
                            received += len(chunk)
            finally:
                moto.proc.send_signal(signal.SIGCONT)
            assert 0 < received < len(large)
            assert (await http.get(f"http://127.0.0.1:{server.config.http_port}/healthz")).status_code == 200


# Expiry


async def test_expired_images_are_refused_at_once_and_deleted_in_the_background(moto, bucket):
    store = S3ImageStore(s3_config(moto, bucket), MemoryExpiryIndex(), reap_every=0.2)
    await store.start()
    try:
        short = await store.put(png_bytes(8, 8), "image/png", 0.6)
        long = await store.put(png_bytes(9, 9), "image/png", 60)
        assert (await store.get(short.image_uuid)).data == short.data
        while time.time() < short.expires_at:
            await asyncio.sleep(0.05)
        # Refused from the moment it expires, whether or not it is deleted yet.
        assert await store.get(short.image_uuid) is None
        assert await store.open(short.image_uuid) is None
        assert await store.presigned_url(short.image_uuid) is None
        await _until(lambda: _gone(moto, bucket, short.image_uuid))
        assert store.counts["deleted"] == 1 and len(store.index) == 1
        assert (await store.get(long.image_uuid)).data == long.data
        # Another process (a restarted serve: an empty index) refuses an expired object by
        # its metadata, and serves a live one.
        stale = await store.put(png_bytes(7, 7), "image/png", 0.3)
        await asyncio.sleep(0.4)
        other = S3ImageStore(s3_config(moto, bucket), MemoryExpiryIndex())
        assert await other.get(stale.image_uuid) is None
        assert (await other.get(long.image_uuid)).media_type == "image/png"
        await other.close()
    finally:
        await store.close()


async def test_an_output_expires_end_to_end(moto, bucket):
    """The gateway's output TTL (short here, in-process): imageURL works, then 404 at
    once when the TTL ends, and the objects are deleted from the bucket."""
    async with serving(s3_gateway(moto, bucket, output_ttl=1.5), NullEngineClient()) as server:
        server.gateway.store.reap_every = 0.2  # (its loop reads it at each turn)
        async with client(server) as c:
            task = upscale_task(outputType="URL")
            item = (await c.run([task]))[task["taskUUID"]][-1]
        async with httpx.AsyncClient() as http:
            assert (await http.get(item["imageURL"])).status_code == 200
            await asyncio.sleep(1.6)
            assert (await http.get(item["imageURL"])).status_code == 404
        for image_uuid in (item["imageUUID"], item["inputImageUUID"]):
            await _until(lambda u=image_uuid: _gone(moto, bucket, u))


# Presigned URLs


async def test_presigned_urls_are_image_urls_and_redirects_fetched_by_a_real_client(moto, bucket):
    config = s3_gateway(moto, bucket, output_ttl=120, store={"presign": True})
    async with serving(config, NullEngineClient()) as server, client(server) as c:
        upload = {
            "taskType": "imageUpload",
            "taskUUID": str(uuid.uuid4()),
            "image": data_uri(png_bytes(30, 20)),
        }
        uploaded = (await c.run([upload]))[upload["taskUUID"]][-1]
        task = upscale_task(uploaded["imageUUID"], outputType="URL")
        item = (await c.run([task]))[task["taskUUID"]][-1]
        short = await server.gateway.store.put(png_bytes(5, 5), "image/png", 1.0)
        async with httpx.AsyncClient() as http:
            for url in (uploaded["imageURL"], item["imageURL"]):
                assert url.startswith(f"{moto.url}/{bucket}/img/") and "X-Amz-Signature=" in url
            expires = int(item["imageURL"].split("X-Amz-Expires=", 1)[1].split("&", 1)[0])
            assert 110 <= expires <= 120  # the image's remaining lifetime
            direct = await http.get(item["imageURL"])
            assert direct.status_code == 200 and Image.open(io.BytesIO(direct.content)).size == (60, 40)
            page = f"http://127.0.0.1:{server.port}/images/{item['imageUUID']}.png"
            redirect = await http.get(page)
            assert redirect.status_code == 302 and "X-Amz-Signature=" in redirect.headers["location"]
            followed = await http.get(page, follow_redirects=True)
            assert followed.status_code == 200 and followed.content == direct.content
            assert followed.headers["content-type"] == "image/png"
            unsigned = item["imageURL"].split("?", 1)[0]
            assert (await http.get(unsigned)).status_code == 403  # the bucket is not public
            await asyncio.sleep(max(0.0, short.expires_at - time.time()) + 0.1)
            expired = f"http://127.0.0.1:{server.port}/images/{short.image_uuid}.png"
            assert (await http.get(expired)).status_code == 404


# The store going away


async def test_a_store_that_stalls_or_dies_fails_its_tasks_fast_and_recovers(tmp_path, aws_env):
    _require_moto()
    moto = MotoServer(tmp_path).start()
    moto.create_bucket("gone")
    config = GatewayConfig(port=0, image_store=s3_config(moto, "gone", timeout=1.5))
    try:
        async with serving(config, NullEngineClient()) as server, client(server) as c:
            before = upscale_task(outputType="URL")
            item = (await c.run([before]))[before["taskUUID"]][-1]
            assert item["status"] == "success"
            polled = upscale_task(deliveryMethod="async")  # its base64 payload is in the store
            await c.send([polled])
            await c.recv()
            assert (await _poll(c, polled["taskUUID"]))["status"] == "success"
            page = f"http://127.0.0.1:{server.port}/images/{item['imageUUID']}.png"
            async with httpx.AsyncClient(timeout=10) as http:
                moto.proc.send_signal(signal.SIGSTOP)  # slow: it accepts, never answers
                try:
                    await _fails_fast(c, http, page, server, polled["taskUUID"])
                finally:
                    moto.proc.send_signal(signal.SIGCONT)
                moto.stop()  # gone: connections refused
                await _fails_fast(c, http, page, server, polled["taskUUID"])
                assert not server.gateway.store.healthy
                moto.start()  # back, on the same port (empty, as moto keeps nothing)
                moto.create_bucket("gone")
                after = upscale_task(outputType="URL")
                item = (await c.run([after]))[after["taskUUID"]][-1]
                assert item["status"] == "success", item
                assert (await http.get(item["imageURL"])).status_code == 200
                assert server.gateway.store.healthy
    finally:
        moto.stop()


async def _fails_fast(c, http: httpx.AsyncClient, page: str, server, polled: str) -> None:
    """Tasks that need the store end with serviceUnavailable within its time-out (plus
    slack), GET of an image is a 503, and the rest of the server goes on."""
    tasks = [
        upscale_task(),
        {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": data_uri(png_bytes(8, 8))},
    ]
    started = time.monotonic()
    results = await c.run(tasks, timeout=20)
    assert time.monotonic() - started < 15  # bounded: no hang (the time-out is 1.5 s)
    for t in tasks:
        error = results[t["taskUUID"]][-1]
        assert error["code"] == "serviceUnavailable" and "image store" in error["message"], error
    assert (await http.get(page)).status_code == 503
    error = await c.error([{"taskType": "getResponse", "taskUUID": polled}])  # its payload is in the store
    assert error["code"] == "serviceUnavailable" and error["taskUUID"] == polled, error
    await c.send([{"taskType": "ping", "ping": True}])
    assert (await c.recv())["data"][0]["pong"] is True
    assert (await http.get(f"http://127.0.0.1:{server.port}/healthz")).status_code == 200


# Outbound safety


async def test_the_store_endpoint_is_exempt_from_the_ssrf_guard_and_nothing_else(moto, bucket):
    """The store on 127.0.0.1 works with private networks refused; a task that names the
    same endpoint (or any private URL) as its input is still refused."""
    async with serving(s3_gateway(moto, bucket), NullEngineClient()) as server, client(server) as c:
        ok = upscale_task()
        item = (await c.run([ok]))[ok["taskUUID"]][-1]
        assert item["status"] == "success"
        sneaky = upscale_task(object_url(moto, bucket, item["imageUUID"]))
        error = (await c.run([sneaky]))[sneaky["taskUUID"]][-1]
        assert error["code"] == "invalidInputImage" and "private or local address" in error["message"]


# The cluster's image contract, on S3


@pytest.fixture
def redis_process(tmp_path):
    from tests.cluster_harness import INSTALL_HINT as REDIS_HINT
    from tests.cluster_harness import REDIS_SERVER, RedisProcess

    if REDIS_SERVER is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"redis-server is missing in CI; {REDIS_HINT}")
        pytest.skip(f"redis-server is not installed; {REDIS_HINT}")
    server = RedisProcess(tmp_path).start()
    yield server
    server.stop()


@pytest.mark.cluster
async def test_a_clusters_expiry_index_hands_each_expired_image_to_one_process(moto, bucket, redis_process):
    """Two stores (two processes of a cluster) on one Redis index, with short TTLs: every
    expired image is refused, then deleted once (by one of them); failed deletions go back."""
    from gateway.cluster.images import RedisExpiryIndex
    from gateway.cluster.link import RedisLink

    link = RedisLink(redis_process.url, name="test")
    await link.start()
    index = RedisExpiryIndex(link)
    stores = [S3ImageStore(s3_config(moto, bucket), index, reap_every=0.2) for _ in range(2)]
    try:
        images = [await stores[i % 2].put(png_bytes(6, 6), "image/png", 0.5) for i in range(10)]
        kept = await stores[0].put(png_bytes(6, 6), "image/png", 60)
        assert await index.expires_at(kept.image_uuid) == pytest.approx(kept.expires_at, abs=0.01)
        assert (await stores[1].get(images[0].image_uuid)).data == images[0].data  # either reads any
        await asyncio.sleep(0.6)
        assert await stores[1].get(images[1].image_uuid) is None  # refused before it is deleted
        for store in stores:
            await store.start()
        for image in images:
            await _until(lambda u=image.image_uuid: _gone(moto, bucket, u))
        assert sum(store.counts["deleted"] for store in stores) == len(images)  # each once
        assert await index.take_due(time.time(), 100) == []
        assert (await stores[0].get(kept.image_uuid)).data == kept.data
        # A deletion that failed goes back, without moving a later expiry earlier.
        await index.put_back([(kept.image_uuid, 1.0), ("gone-for-now", 2.0)])
        assert await index.expires_at(kept.image_uuid) == pytest.approx(kept.expires_at, abs=0.01)
        assert await index.take_due(time.time(), 100) == [("gone-for-now", 2.0)]
    finally:
        for store in stores:
            await store.close()
        await link.close()


@pytest.mark.cluster
async def test_images_and_uploads_work_on_every_gateway_with_s3(moto, bucket, redis_process, tmp_path):
    """test_cluster's image contract (imageURL, uploaded UUIDs and outputs as inputs, on
    every gateway) with the images in S3: Redis holds their expiry index, not their bytes."""
    from tests import test_cluster
    from tests.cluster_harness import Cluster

    common = ["--claim-timeout", "2", "--shutdown-grace", "3"]
    common += ["--image-store", f"s3://{bucket}/img", "--s3-endpoint-url", moto.url]
    cluster = Cluster(redis_process, tmp_path, common=common)
    try:
        await test_cluster.test_images_and_uploads_work_on_every_gateway(cluster)
    finally:
        cluster.close()
        print(cluster.logs())
    assert redis_process.command(b"EVAL", b"return #redis.call('KEYS', 'lu:img:*')", b"0") == b":0"
    indexed = int(redis_process.command(b"ZCARD", b"lu:img-expiry")[1:])
    assert indexed >= 3  # the upload and two outputs, at least
    listed = await asyncio.to_thread(moto.keys, bucket, "img/")
    assert len(listed) == indexed


@pytest.mark.cluster
async def test_a_store_that_stalls_while_a_worker_runs_fails_those_tasks_and_the_cluster_goes_on(
    moto, bucket, redis_process, tmp_path
):
    """The worker's side: the store stops answering while tasks denoise, so writing their
    outputs fails: each ends with serviceUnavailable, once, within the time-out; when
    the store answers again the next task succeeds."""
    from tests.cluster_harness import Cluster
    from tests.test_cluster import connected, terminal, wait_for

    common = ["--claim-timeout", "2", "--shutdown-grace", "3", "--s3-timeout", "1.5"]
    common += ["--image-store", f"s3://{bucket}/img", "--s3-endpoint-url", moto.url]
    cluster = Cluster(redis_process, tmp_path, common=common)
    try:
        gw, w = cluster.gateway("gw"), cluster.worker("w")
        await cluster.ready(gw, w)
        tasks = [upscale_task(settings={"steps": 40}) for _ in range(2)]
        async with connected(gw.url) as c:
            await c.send(tasks)
            await wait_for(lambda: _holds(w, 2), every=0.05)
            moto.proc.send_signal(signal.SIGSTOP)
            try:
                ended = await c.collect({t["taskUUID"] for t in tasks}, timeout=60)
                assert await c.quiet(0.5) == []  # each answered once
            finally:
                moto.proc.send_signal(signal.SIGCONT)
            for items in ended.values():
                error = terminal(items)
                assert len(error) == 1 and error[0]["code"] == "serviceUnavailable", items
                assert "image store" in error[0]["message"]
            again = upscale_task(outputType="URL")
            item = (await c.run([again], timeout=60))[again["taskUUID"]][-1]
            assert item["status"] == "success", item
    finally:
        cluster.close()
        print(cluster.logs())


async def _holds(worker, count: int) -> bool:
    stats = await worker.stats()
    return stats["held"] >= count and stats["engine"]["unet_calls"] > 0


# Configuration


def test_image_store_flags_and_their_checks(tmp_path, moto, aws_env, monkeypatch):
    from gateway.__main__ import build_parser, config_from_args

    args = build_parser().parse_args(
        ["serve", "--image-store", "s3://bkt/a/b/", "--s3-endpoint-url", moto.url, "--s3-presign"]
    )
    store = config_from_args(args).image_store
    assert (store.kind, store.bucket, store.prefix, store.presign) == ("s3", "bkt", "a/b", True)
    assert config_from_args(build_parser().parse_args(["serve"])).image_store.kind == "memory"
    monkeypatch.setenv("LATENT_UPSCALER_IMAGE_STORE", "s3://from-env/p")
    monkeypatch.setenv("LATENT_UPSCALER_S3_PRESIGN", "true")
    monkeypatch.setenv("LATENT_UPSCALER_S3_TIMEOUT", "2.5")
    store = config_from_args(
        build_parser().parse_args(["worker", "--redis-url", "redis://x:1/0"])
    ).image_store
    assert (store.bucket, store.prefix, store.presign, store.timeout) == ("from-env", "p", True, 2.5)
    monkeypatch.delenv("LATENT_UPSCALER_IMAGE_STORE")
    gateway = build_parser().parse_args(["gateway", "--redis-url", "redis://127.0.0.1:1/0"])
    assert config_from_args(gateway).image_store.kind == "redis"
    for bad in ("s3://", "file:///tmp", "S3"):
        with pytest.raises(ValueError, match="--image-store"):
            ImageStoreConfig.parse(bad)
    with pytest.raises(ValueError, match="for a cluster"):
        from gateway.images import image_store

        image_store(ImageStoreConfig("redis"))
    # A process on a bucket that does not exist stops at once, saying so.
    import subprocess
    import sys

    command = [sys.executable, "-m", "gateway", "serve", "--model", "sim:1,0", "--port", "0"]
    command += ["--image-store", "s3://no-such-bucket/x", "--s3-endpoint-url", moto.url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ})
    assert done.returncode == 2 and "s3://no-such-bucket" in done.stderr, done.stderr
    assert "the bucket does not exist (NoSuchBucket)" in done.stderr.splitlines()[-1], done.stderr
    assert "testing-secret" not in done.stderr + done.stdout  # never a credential in the logs


def test_credentials_come_from_the_environment_or_the_shared_file(tmp_path, monkeypatch):
    from gateway import objectstore

    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    (tmp_path / "credentials").write_text(
        "[default]\naws_access_key_id = A\naws_secret_access_key = B\n"
        "[ops]\naws_access_key_id = C\naws_secret_access_key = D\n"
        "aws_session_token = T\n"
    )
    (tmp_path / "config").write_text("[profile ops]\nregion = eu-west-3\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    assert objectstore._file_credentials() == {"access_key_id": "A", "secret_access_key": "B"}
    assert objectstore._region() == "us-east-1"
    monkeypatch.setenv("AWS_PROFILE", "ops")
    assert objectstore._file_credentials() == {
        "access_key_id": "C",
        "secret_access_key": "D",
        "session_token": "T",
    }
    assert objectstore._region() == "eu-west-3"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "E")  # the environment wins: obstore reads it itself
    assert objectstore._file_credentials() == {}


# Helpers


async def _poll(c, task_uuid: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await c.send([{"taskType": "getResponse", "taskUUID": task_uuid}])
        item = (await c.recv())["data"][0]
        if item.get("status") != "processing":
            return item
        await asyncio.sleep(0.1)
    raise AssertionError(f"{task_uuid} not finished")


async def _gone(moto: MotoServer, bucket: str, image_uuid: str) -> bool:
    return await stored_object(moto, bucket, image_uuid) is None


async def _until(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)
