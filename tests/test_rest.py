"""The REST transport (``POST /v1``) over real HTTP on 127.0.0.1, with the null engine:
every task type, each status of PROTOCOL.md's mapping, retries, time-outs, hang-ups,
limits and CORS; and how it shares task records with the WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import httpx
import orjson
import pytest
from PIL import Image

from engine.client import NullEngineClient
from gateway.http import Outbound, RetryPolicy
from gateway.rest import status_of
from tests.conftest import (
    HeldEngineClient,
    client,
    data_uri,
    decode_result_image,
    png_bytes,
    serving,
    upscale_task,
    wait_until,
)

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@contextlib.asynccontextmanager
async def rest_serving(engine=None, **overrides):
    """A gateway with its REST port, and an HTTP client for it."""
    overrides.setdefault("api_keys", (KEY, "other-key"))
    async with (
        serving(engine=engine or NullEngineClient(), http_port=0, **overrides) as server,
        httpx.AsyncClient(base_url=server.http_url.removesuffix("/v1"), timeout=30) as http,
    ):
        server.http = http
        yield server


@pytest.fixture
async def rest_server():
    async with rest_serving() as server:
        yield server


async def post(server, tasks, headers=AUTH, path="/v1") -> httpx.Response:
    return await server.http.post(path, json=tasks, headers=headers)


def only_error(response: httpx.Response) -> dict:
    body = response.json()
    assert "data" not in body and len(body["errors"]) == 1, body
    return body["errors"][0]


def get_response(task_uuid: str) -> list[dict]:
    return [{"taskType": "getResponse", "taskUUID": task_uuid}]


# Every task type


@pytest.mark.parametrize("path", ["/v1", "/v1/", "/"])
async def test_a_sync_upscale_is_answered_with_its_result(rest_server, path):
    task = upscale_task()
    response = await post(rest_server, [task], path=path)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    [item] = response.json()["data"]
    assert "errors" not in response.json()
    assert (item["taskUUID"], item["status"], item["taskType"]) == (
        task["taskUUID"],
        "success",
        "imageUpscale",
    )
    assert decode_result_image(item).size == (80, 48)


async def test_every_output_type_and_format(rest_server):
    tasks = [
        upscale_task(outputType=kind, outputFormat=fmt)
        for kind in ("URL", "base64Data", "dataURI")
        for fmt in ("JPG", "PNG", "WEBP")
    ]
    response = await post(rest_server, tasks)
    assert response.status_code == 200
    items = response.json()["data"]
    assert [i["taskUUID"] for i in items] == [t["taskUUID"] for t in tasks]  # task order
    for task, item in zip(tasks, items):
        if task["outputType"] == "URL":
            fetched = await rest_server.http.get(item["imageURL"])
            image = Image.open(io.BytesIO(fetched.content))
        else:
            image = decode_result_image(item)
            if task["outputType"] == "dataURI":
                assert item["imageDataURI"].startswith(f"data:{Image.MIME[image.format]};base64,")
        assert image.size == (80, 48)
        assert image.format == {"JPG": "JPEG"}.get(task["outputFormat"], task["outputFormat"])


@pytest.mark.parametrize("task_type", ["upscale", "imageUpscale"])
async def test_replies_carry_the_requests_own_task_type(rest_server, task_type):
    sync = upscale_task(taskType=task_type)
    later = upscale_task(taskType=task_type, deliveryMethod="async")
    bad = upscale_task(taskType=task_type, outputQuality=5)
    assert (await post(rest_server, [sync])).json()["data"][0]["taskType"] == task_type
    ack = await post(rest_server, [later])
    assert ack.json() == {"data": [{"taskType": task_type, "taskUUID": later["taskUUID"]}]}
    await wait_until(lambda: rest_server.gateway.sessions.lookup(KEY, later["taskUUID"]).finished)
    polled = (await post(rest_server, get_response(later["taskUUID"]))).json()["data"][0]
    assert (polled["taskType"], polled["status"]) == (task_type, "success")
    error = only_error(await post(rest_server, [bad]))
    assert (error["code"], error["taskType"]) == ("invalidOutputQuality", task_type)


async def test_an_upscale_without_model_runs_on_the_loaded_model(rest_server):
    task = upscale_task(taskType="upscale")
    del task["model"]
    item = (await post(rest_server, [task])).json()["data"][0]
    assert (item["status"], item["taskType"]) == ("success", "upscale")
    response = await post(rest_server, [upscale_task(model="someone:else@1")])
    assert response.status_code == 400
    assert (only_error(response)["code"], only_error(response)["parameter"]) == ("invalidModel", "model")


async def test_async_is_acknowledged_then_polled_with_get_response(rest_server):
    engine = rest_server.gateway.engine
    task = upscale_task(deliveryMethod="async", outputType="URL", outputFormat="JPG")
    ack = await post(rest_server, [task])
    assert ack.status_code == 200
    assert ack.json() == {"data": [{"taskType": "imageUpscale", "taskUUID": task["taskUUID"]}]}
    for _ in range(100):  # as the SDKs poll
        item = (await post(rest_server, get_response(task["taskUUID"]))).json()["data"][0]
        if item["status"] == "success":
            break
        assert not any(k.endswith(("URL", "Base64Data", "DataURI")) for k in item), item
        await asyncio.sleep(0.02)
    assert item["status"] == "success" and item["imageURL"].endswith(".jpg")
    assert engine.stats().succeeded == 1


async def test_get_response_of_a_task_still_running():
    engine = HeldEngineClient()
    async with rest_serving(engine) as server:
        task = upscale_task(deliveryMethod="async")
        assert (await post(server, [task])).status_code == 200
        await wait_until(lambda: len(engine.held) == 1)
        response = await post(server, get_response(task["taskUUID"]))
        assert response.status_code == 200
        assert response.json()["data"] == [
            {"taskType": "imageUpscale", "taskUUID": task["taskUUID"], "status": "processing", "progress": 0}
        ]
        engine.release(stop_holding=True)


async def test_upload_then_upscale_by_uuid(rest_server):
    upload = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": data_uri(png_bytes(30, 20))}
    response = await post(rest_server, [upload])
    assert response.status_code == 200
    [item] = response.json()["data"]
    assert item["taskType"] == "imageUpload" and item["imageURL"].endswith(".png")
    task = upscale_task(item["imageUUID"])
    result = (await post(rest_server, [task])).json()["data"][0]
    assert result["inputImageUUID"] == item["imageUUID"] and decode_result_image(result).size == (60, 40)


async def test_ping_needs_no_key(rest_server):
    response = await post(rest_server, [{"taskType": "ping", "ping": True}], headers={})
    assert response.status_code == 200
    assert response.json() == {"data": [{"taskType": "ping", "pong": True}]}


# Authentication


async def test_an_authentication_task_first_instead_of_the_header(rest_server):
    task = upscale_task()
    auth = {"taskType": "authentication", "apiKey": KEY}
    response = await post(rest_server, [auth, task], headers={})
    assert response.status_code == 200
    first, result = response.json()["data"]
    assert first == {"taskType": "authentication"}
    assert result["taskUUID"] == task["taskUUID"] and result["status"] == "success"
    # Elsewhere in the array it is a request fault of its own.
    response = await post(rest_server, [upscale_task(), auth])
    assert response.status_code == 400
    [error] = response.json()["errors"]
    assert (error["code"], error["taskType"]) == ("invalidPayload", "authentication")
    assert response.json()["data"][0]["status"] == "success"


@pytest.mark.parametrize(
    ("headers", "first", "code"),
    [
        ({}, None, "missingApiKey"),
        ({"Authorization": "Bearer wrong"}, None, "invalidApiKey"),
        ({"Authorization": "Basic dGVzdC1rZXk6"}, None, "missingApiKey"),
        ({}, {"taskType": "authentication", "apiKey": "wrong"}, "invalidApiKey"),
        ({}, {"taskType": "authentication"}, "missingApiKey"),
        ({}, {"taskType": "authentication", "apiKey": 7}, "invalidApiKey"),
        (AUTH, {"taskType": "authentication", "apiKey": "other-key"}, "invalidApiKey"),
    ],
)
async def test_a_missing_or_wrong_key_is_401(rest_server, headers, first, code):
    task = upscale_task()
    response = await post(rest_server, [first, task] if first else [task], headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    error = only_error(response)
    assert (error["code"], error["parameter"], error["taskType"]) == (code, "apiKey", "authentication")
    assert rest_server.gateway.sessions.lookup(KEY, task["taskUUID"]) is None  # nothing ran


async def test_failed_keys_are_rate_limited_per_address_on_both_transports():
    async with rest_serving(auth_failures_per_minute=2) as server:
        for _ in range(2):
            assert (
                await post(server, [upscale_task()], headers={"Authorization": "Bearer no"})
            ).status_code == 401
        response = await post(server, [upscale_task()])  # even the right key, for a minute
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert only_error(response)["code"] == "rateLimitExceeded"
        async with client(server, key=None) as c:  # one limiter for the socket and REST
            error = await c.error([{"taskType": "authentication", "apiKey": KEY}])
            assert error["code"] == "rateLimitExceeded"


# Status codes


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", "invalidJSON"),
        (b'{"taskType": "ping"}', "invalidPayload"),
        (b"[]", "invalidPayload"),
        (b"[1, 2]", "invalidPayload"),
        (b"\xff\xfe[]", "invalidJSON"),
    ],
)
async def test_a_malformed_body_is_400(rest_server, body, code):
    response = await rest_server.http.post("/v1", content=body, headers=AUTH)
    assert response.status_code == 400 and only_error(response)["code"] == code


async def test_a_task_fault_is_400_and_names_the_task(rest_server):
    task = upscale_task(upscaleFactor=4)
    response = await post(rest_server, [task])
    assert response.status_code == 400
    error = only_error(response)
    assert (error["code"], error["parameter"], error["taskUUID"]) == (
        "invalidUpscaleFactor",
        "upscaleFactor",
        task["taskUUID"],
    )


async def test_an_unknown_task_uuid_is_404_for_get_response(rest_server):
    unknown = str(uuid.uuid4())
    response = await post(rest_server, get_response(unknown))
    assert response.status_code == 404
    assert (only_error(response)["code"], only_error(response)["taskUUID"]) == ("invalidTaskUUID", unknown)
    malformed = await post(rest_server, get_response("not-a-uuid"))
    assert malformed.status_code == 400 and only_error(malformed)["code"] == "invalidTaskUUID"


async def test_another_keys_task_is_not_found_and_its_uuid_conflicts(rest_server):
    task = upscale_task()
    assert (await post(rest_server, [task])).status_code == 200
    other = {"Authorization": "Bearer other-key"}
    assert (await post(rest_server, get_response(task["taskUUID"]), headers=other)).status_code == 404
    response = await post(rest_server, [task], headers=other)  # the same task from another key
    assert response.status_code == 409 and only_error(response)["code"] == "conflictTaskUUID"


async def test_a_body_over_the_size_limit_is_413():
    async with rest_serving(max_frame_bytes=4096) as server:
        big = upscale_task(data_uri(png_bytes(200, 200, (1, 2, 3)) + b"\0" * 5000))
        response = await post(server, [big])
        assert response.status_code == 413 and only_error(response)["code"] == "invalidPayload"

        async def chunks():  # no Content-Length: counted as it arrives
            yield b'[{"taskType": "ping", "x": "'
            for _ in range(10):
                yield b"a" * 1000
            yield b'"}]'

        response = await server.http.post("/v1", content=chunks(), headers=AUTH)
        assert response.status_code == 413
        assert (await post(server, [upscale_task()])).status_code == 200  # the next one is fine


async def raw_exchange(
    port: int, head: bytes, body: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body)
    return reader, writer


async def test_expect_100_continue_is_answered_before_the_body(rest_server):
    """curl sends bodies over 1 KiB only after a 100 Continue (or a second's wait)."""
    body = orjson.dumps([upscale_task()])
    head = (
        b"POST /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer test-key\r\n"
        b"Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    reader, writer = await raw_exchange(rest_server.config.http_port, head)
    try:
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(
            b"HTTP/1.1 100 Continue"
        )
        writer.write(body)
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def test_a_body_that_stops_arriving_is_408():
    async with rest_serving(idle_timeout=0.3) as server:
        head = b"POST /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer test-key\r\nContent-Length: 100\r\n\r\n"
        reader, writer = await raw_exchange(server.config.http_port, head, b'[{"taskType"')
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            body = await asyncio.wait_for(reader.readexactly(length), 10)
        finally:
            writer.close()
        assert head.startswith(b"HTTP/1.1 408")
        assert orjson.loads(body)["errors"][0]["code"] == "timeout"


async def test_too_many_tasks_in_a_body_is_413():
    async with rest_serving(max_tasks_per_frame=3) as server:
        response = await post(server, [{"taskType": "ping"}] * 4)
        assert response.status_code == 413 and "at most 3" in only_error(response)["message"]


async def test_the_in_flight_limit_per_key_is_429():
    engine = HeldEngineClient()
    async with rest_serving(engine, max_in_flight_per_key=1) as server:
        running = upscale_task(deliveryMethod="async")
        assert (await post(server, [running])).status_code == 200
        refused = upscale_task()
        response = await post(server, [refused])
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        error = only_error(response)
        assert (error["code"], error["taskUUID"]) == ("rateLimitExceeded", refused["taskUUID"])
        other = asyncio.create_task(
            post(server, [upscale_task()], headers={"Authorization": "Bearer other-key"})
        )
        await wait_until(lambda: len(engine.held) == 2)  # another key is not affected
        engine.release(stop_holding=True)
        assert (await other).status_code == 200
        assert (await post(server, [refused])).status_code == 200  # room again: the retry runs


async def test_the_in_flight_limit_per_connection_bounds_one_request():
    """REST's connection is a request: the tasks of one body beyond the limit are refused."""
    engine = HeldEngineClient()
    async with rest_serving(engine, max_in_flight_per_connection=2) as server:
        three = [upscale_task(), upscale_task(), upscale_task()]
        request = asyncio.create_task(post(server, three))
        await wait_until(lambda: len(engine.held) == 2)
        engine.release(stop_holding=True)
        response = await request
        assert response.status_code == 429
        assert [i["taskUUID"] for i in response.json()["data"]] == [t["taskUUID"] for t in three[:2]]
        [error] = response.json()["errors"]
        assert (error["code"], error["taskUUID"]) == ("rateLimitExceeded", three[2]["taskUUID"])
        assert (await post(server, three[2:])).status_code == 200  # another request has room


async def test_a_fault_inside_the_gateway_is_500(rest_server, monkeypatch):
    async def broken(task):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(rest_server.gateway, "_image_upload_frame", broken)
    upload = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": data_uri(png_bytes(8, 8))}
    response = await post(rest_server, [upload])
    assert response.status_code == 500
    error = only_error(response)
    assert (error["code"], error["message"], error["taskUUID"]) == (
        "internalError",
        "internal server error",
        upload["taskUUID"],
    )


async def test_a_failed_upload_endpoint_is_502(local_http):
    async def no_sleep(_: float) -> None:
        return None

    local_http.fail_next = 10
    outbound = Outbound(allow_private=True, sleep=no_sleep, retry=RetryPolicy(tries=2))
    async with rest_serving(allow_private_networks=True, outbound=outbound) as server:
        task = upscale_task(uploadEndpoint=local_http.url + "/put/x.png")
        response = await post(server, [task])
        assert response.status_code == 502 and only_error(response)["code"] == "uploadFailed"


async def test_an_engine_that_is_not_ready_is_503(rest_server):
    await rest_server.gateway.engine.close()
    task = upscale_task()
    response = await post(rest_server, [task])
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    error = only_error(response)
    assert (error["code"], error["taskUUID"]) == ("serviceUnavailable", task["taskUUID"])
    assert (await rest_server.http.get("/readyz")).status_code == 503
    assert (await post(rest_server, [{"taskType": "ping"}])).status_code == 200


async def test_a_timed_out_task_is_504_goes_on_and_is_kept_for_get_response():
    engine = HeldEngineClient()
    async with rest_serving(engine, rest_timeout=0.2) as server:
        task = upscale_task()
        response = await post(server, [task])
        assert response.status_code == 504
        error = only_error(response)
        assert (error["code"], error["taskUUID"], error["taskType"]) == (
            "timeout",
            task["taskUUID"],
            "imageUpscale",
        )
        engine.release(stop_holding=True)
        await wait_until(lambda: server.gateway.sessions.lookup(KEY, task["taskUUID"]).finished)
        item = (await post(server, get_response(task["taskUUID"]))).json()["data"][0]
        assert item["status"] == "success" and decode_result_image(item).size == (80, 48)


async def test_a_body_mixing_outcomes_takes_its_highest_error_status():
    engine = HeldEngineClient(max_queue=1)
    async with rest_serving(engine) as server:
        held = upscale_task(deliveryMethod="async")  # takes the engine's one place
        assert (await post(server, [held])).status_code == 200
        ping, bad, unknown = (
            {"taskType": "ping"},
            upscale_task(upscaleFactor=3),
            get_response(str(uuid.uuid4()))[0],
        )
        response = await post(server, [ping, bad, unknown])
        assert response.status_code == 404  # 400 and 404: the highest
        body = response.json()
        assert body["data"] == [{"taskType": "ping", "pong": True}]
        assert [e["code"] for e in body["errors"]] == ["invalidUpscaleFactor", "invalidTaskUUID"]
        full = upscale_task()  # the engine's queue is full: 429 beats 404 and 400
        response = await post(server, [bad | {"taskUUID": str(uuid.uuid4())}, full, unknown])
        assert response.status_code == 429
        assert [e["code"] for e in response.json()["errors"]] == [
            "invalidUpscaleFactor",
            "rateLimitExceeded",
            "invalidTaskUUID",
        ]
        engine.release(stop_holding=True)


def test_the_status_mapping():
    assert [
        status_of(code)
        for code in (
            "invalidInputImage",
            "missingInputImage",
            "unsupportedTaskType",
            "invalidApiKey",
            "missingApiKey",
            "conflictTaskUUID",
            "rateLimitExceeded",
            "internalError",
            "serviceUnavailable",
            "taskAborted",
            "timeout",
            "uploadFailed",
        )
    ] == [400, 400, 400, 401, 401, 409, 429, 500, 503, 503, 504, 502]
    assert status_of("invalidTaskUUID") == 400 and status_of("invalidTaskUUID", get_response=True) == 404


# Retries, hang-ups, shutdown


async def test_a_retry_attaches_to_the_running_task_then_gets_its_result():
    engine = HeldEngineClient()
    async with rest_serving(engine, rest_timeout=0.2) as server:
        task = upscale_task()
        assert (await post(server, [task])).status_code == 504
        assert (await post(server, [task])).status_code == 504  # still running: attached, not 409
        retry = asyncio.create_task(post(server, [task]))
        await asyncio.sleep(0.05)
        engine.release(stop_holding=True)
        response = await retry
        assert response.status_code == 200 and response.json()["data"][0]["status"] == "success"
        again = await post(server, [task])  # finished: its result again
        assert again.json() == response.json()
        assert engine.stats().succeeded == 1  # it ran once


async def test_a_retry_of_an_async_task_gets_its_acknowledgement_again():
    engine = HeldEngineClient()
    async with rest_serving(engine) as server:
        task = upscale_task(deliveryMethod="async")
        first, second = await post(server, [task]), await post(server, [task])
        assert first.status_code == second.status_code == 200 and first.json() == second.json()
        engine.release(stop_holding=True)
        await wait_until(lambda: server.gateway.sessions.lookup(KEY, task["taskUUID"]).finished)
        assert (await post(server, [task])).json() == first.json()
        assert engine.stats().succeeded == 1


async def test_a_retry_with_other_content_conflicts(rest_server):
    task = upscale_task()
    assert (await post(rest_server, [task])).status_code == 200
    response = await post(rest_server, [{**task, "outputFormat": "WEBP"}])
    assert response.status_code == 409
    error = only_error(response)
    assert (error["code"], error["taskUUID"]) == ("conflictTaskUUID", task["taskUUID"])


async def test_a_retry_after_a_429_runs_the_task_again():
    engine = HeldEngineClient(max_queue=1)
    async with rest_serving(engine) as server:
        assert (await post(server, [upscale_task(deliveryMethod="async")])).status_code == 200
        task = upscale_task()
        assert (await post(server, [task])).status_code == 429  # the engine's queue is full
        engine.release(stop_holding=True)
        response = await post(server, [task])
        assert response.status_code == 200 and response.json()["data"][0]["status"] == "success"


async def test_task_uuids_are_shared_with_the_websocket(rest_server):
    sent_on_socket = upscale_task()
    async with client(rest_server, key=KEY) as c:
        await c.run([sent_on_socket])
        response = await post(rest_server, [sent_on_socket])  # never attaches to a socket's task
        assert response.status_code == 409
        sent_on_rest = upscale_task()
        assert (await post(rest_server, [sent_on_rest])).status_code == 200
        assert (await c.error([sent_on_rest]))["code"] == "conflictTaskUUID"
        await c.send(get_response(sent_on_rest["taskUUID"]))
        assert (await c.recv())["data"][0]["status"] == "success"
        assert await c.quiet() == []  # a REST task's result never goes to a socket


async def test_a_client_that_hangs_up_does_not_lose_its_task():
    engine = HeldEngineClient()
    async with rest_serving(engine) as server:
        task = upscale_task()
        request = asyncio.create_task(post(server, [task]))
        await wait_until(lambda: len(engine.held) == 1)
        request.cancel()  # closes the connection mid-request
        with contextlib.suppress(asyncio.CancelledError):
            await request
        await server.http.aclose()
        await asyncio.sleep(0.1)
        engine.release(stop_holding=True)
        await wait_until(lambda: server.gateway.sessions.lookup(KEY, task["taskUUID"]).finished)
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            item = (await http.post("", json=get_response(task["taskUUID"]), headers=AUTH)).json()["data"][0]
        assert item["status"] == "success" and item["taskUUID"] == task["taskUUID"]


async def test_a_request_waiting_at_shutdown_is_answered():
    engine = HeldEngineClient()
    async with rest_serving(engine) as server:
        task = upscale_task()
        request = asyncio.create_task(post(server, [task]))
        await wait_until(lambda: len(engine.held) == 1)
        await server.close(grace=0.1)  # the task never finishes: the engine stops under it
        response = await request
        assert response.status_code == 503
        error = only_error(response)
        assert (error["code"], error["taskUUID"]) == ("taskAborted", task["taskUUID"])


# The GET endpoints and CORS


async def test_images_health_and_readiness_on_the_http_port(rest_server):
    task = upscale_task(outputType="URL", outputFormat="PNG")
    url = (await post(rest_server, [task])).json()["data"][0]["imageURL"]
    path = "/images/" + url.rsplit("/", 1)[1]
    for base in (f"http://127.0.0.1:{rest_server.port}", str(rest_server.http.base_url)):
        async with httpx.AsyncClient(base_url=base) as http:
            image = await http.get(path)
            assert image.status_code == 200 and image.headers["content-type"] == "image/png"
            assert "max-age" in image.headers["cache-control"]
            assert (await http.get("/healthz")).text == "ok\n"
            assert (await http.get("/readyz")).status_code == 200
            assert (await http.get(f"/images/{uuid.uuid4()}.png")).status_code == 404
    head = await rest_server.http.head(path)
    assert head.status_code == 200 and head.content == b""
    assert (await rest_server.http.get("/nothing")).status_code == 404
    not_allowed = await rest_server.http.get("/v1")
    assert not_allowed.status_code == 405 and "POST" in not_allowed.headers["allow"]
    assert (await rest_server.http.put("/v1", content=b"[]")).status_code == 405


async def test_cors_preflight_and_responses():
    origin = "https://app.example.com"
    async with rest_serving(cors_origins=(origin,)) as server:
        preflight = {
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        response = await server.http.options("/v1", headers=preflight)
        assert response.status_code == 204
        assert response.headers["access-control-allow-origin"] == origin
        assert "POST" in response.headers["access-control-allow-methods"]
        assert "Authorization" in response.headers["access-control-allow-headers"]
        refused = await server.http.options("/v1", headers={**preflight, "Origin": "https://evil.example"})
        assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
        answered = await post(server, [{"taskType": "ping"}], headers={**AUTH, "Origin": origin})
        assert answered.headers["access-control-allow-origin"] == origin
        assert answered.headers["vary"] == "Origin"
        error = await post(server, [upscale_task()], headers={"Origin": origin})  # 401 is readable too
        assert error.status_code == 401 and error.headers["access-control-allow-origin"] == origin
        other = await post(server, [{"taskType": "ping"}], headers={**AUTH, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


async def test_no_cors_by_default(rest_server):
    headers = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}
    assert (await rest_server.http.options("/v1", headers=headers)).status_code == 403
    response = await post(
        rest_server, [{"taskType": "ping"}], headers={**AUTH, "Origin": "https://a.example"}
    )
    assert "access-control-allow-origin" not in response.headers


# The README's examples


def readme_curl_examples() -> list[str]:
    """The bash blocks of the README's REST section, as written."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n### REST\n", 1)[1]
    section = section.split("\n## ", 1)[0].split("\n### ", 1)[0]  # up to the next heading
    return re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)


async def run_example(script: str, url: str) -> list[tuple[dict, int]]:
    """Run one example with bash; each curl prints a body and a status on one line."""
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        script,
        env={**os.environ, "URL": url, "KEY": KEY},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    answers = []
    for line in out.decode().splitlines():
        body, _, status = line.rpartition(" ")
        answers.append((json.loads(body), int(status)))
    return answers


async def test_the_readme_curl_examples_run_as_written(rest_server):
    if shutil.which("curl") is None:
        message = "curl is needed for the README's examples: apt-get install -y --no-install-recommends curl"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    sync, async_, auth_task, wrong_key = readme_curl_examples()
    url = rest_server.http_url

    [(body, status)] = await run_example(sync, url)
    assert status == 200 and body["data"][0]["status"] == "success", body
    fetched = await rest_server.http.get(body["data"][0]["imageURL"])
    assert Image.open(io.BytesIO(fetched.content)).size == (16, 16)

    (ack, status), (polled, poll_status) = await run_example(async_, url)
    assert status == poll_status == 200
    assert ack == {"data": [{"taskType": "upscale", "taskUUID": "9c0e2a71-5d3b-4f86-a1e4-7b2d9f0c3e18"}]}
    assert polled["data"][0]["status"] in ("processing", "success"), polled

    [(body, status)] = await run_example(auth_task, url)
    assert status == 200 and body["data"][0] == {"taskType": "authentication"}, body
    assert body["data"][1]["taskType"] == "imageUpload" and body["data"][1]["imageURL"].endswith(".png")

    [(body, status)] = await run_example(wrong_key, url)
    assert status == 401 and body["errors"][0]["code"] == "invalidApiKey", body
