"""Where results go and where inputs come from: URL inputs, webhooks, upload
endpoints, and the SSRF guard, against real local HTTP servers."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from engine.client import NullEngineClient
from gateway.config import GatewayConfig
from gateway.http import Outbound, RetryPolicy
from tests.conftest import client, png_bytes, serving, upscale_task


async def no_sleep(_: float) -> None:
    return None


@pytest.fixture
async def open_server():
    """A server started with --allow-private-networks (and retries without waiting)."""
    config = GatewayConfig(port=0, allow_private_networks=True)
    outbound = Outbound(allow_private=True, sleep=no_sleep, retry=RetryPolicy(tries=5))
    async with serving(config, NullEngineClient(), outbound=outbound) as server:
        yield server


async def wait_for(predicate, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_an_image_url_input_is_fetched_and_upscaled(open_server, local_http):
    local_http.files["/in.png"] = (png_bytes(30, 20), "image/png")
    task = upscale_task(local_http.url + "/in.png")
    async with client(open_server) as c:
        item = (await c.run([task]))[task["taskUUID"]][-1]
    assert item["status"] == "success", item


async def test_private_urls_are_refused_by_default(null_server, local_http):
    local_http.files["/in.png"] = (png_bytes(30, 20), "image/png")
    async with client(null_server) as c:
        for url in (local_http.url + "/in.png", "http://192.168.1.10/in.png"):
            task = upscale_task(url)
            error = (await c.run([task]))[task["taskUUID"]][-1]
            assert (error["code"], error["parameter"]) == ("invalidInputImage", "inputImage")
            assert "private or local" in error["message"] and "--allow-private-networks" in error["message"]


async def test_a_redirect_to_a_private_address_is_refused(local_http):
    # Even when the first hop is allowed, each hop is checked again.
    from gateway.http import AddressGuard, OutboundError

    class FirstHopAllowed(AddressGuard):
        async def check(self, url: str) -> None:
            if "/redirect" in url:
                return
            await super().check(url)

    out = Outbound()
    out.guard = FirstHopAllowed()
    with pytest.raises(OutboundError) as err:
        await out.fetch(f"{local_http.url}/redirect?to={local_http.url}/in.png", max_bytes=10_000)
    assert err.value.reason == "blocked"
    await out.aclose()


async def test_webhook_receives_the_result_and_is_retried(open_server, local_http):
    local_http.fail_next = 1
    task = upscale_task(webhookURL=local_http.url + "/hook", outputType="URL", taskType="upscale")
    async with client(open_server) as c:
        item = (await c.run([task]))[task["taskUUID"]][-1]
    await wait_for(lambda: len(local_http.received) >= 2)
    (m1, p1, _, _), (m2, path, content_type, body) = local_http.received[:2]
    assert (m1, p1, m2, path, content_type) == ("POST", "/hook", "POST", "/hook", "application/json")
    posted = orjson.loads(body)
    assert posted == item and "data" not in posted
    assert posted["taskType"] == "upscale"  # the request's own taskType


async def test_upload_endpoint_gets_the_bytes_before_the_result(open_server, local_http):
    task = upscale_task(
        uploadEndpoint=local_http.url + "/put/out.webp", outputFormat="WEBP", outputType="URL"
    )
    async with client(open_server) as c:
        item = (await c.run([task]))[task["taskUUID"]][-1]
    assert item["status"] == "success"
    method, path, content_type, body = local_http.received[0]
    assert (method, path, content_type) == ("PUT", "/put/out.webp", "image/webp")
    assert body[:4] == b"RIFF" and body[8:12] == b"WEBP"


async def test_a_failing_upload_ends_the_task_with_upload_failed(open_server, local_http):
    local_http.fail_next = 10
    task = upscale_task(uploadEndpoint=local_http.url + "/put/x.png")
    async with client(open_server) as c:
        error = (await c.run([task]))[task["taskUUID"]][-1]
    assert (error["code"], error["taskUUID"], error["parameter"]) == (
        "uploadFailed",
        task["taskUUID"],
        "uploadEndpoint",
    )
    assert len([r for r in local_http.received if r[0] == "PUT"]) == 5
