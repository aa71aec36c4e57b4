"""The gateway over real sockets on 127.0.0.1 with the model-free null engine: every
protocol path this server owns, and the connection still working after each error."""

from __future__ import annotations

import asyncio
import base64
import uuid

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from engine.client import NullEngineClient
from gateway.config import GatewayConfig
from gateway.server import GatewayServer
from tests.conftest import (
    Client,
    FakeClock,
    HeldEngineClient,
    client,
    data_uri,
    decode_result_image,
    png_bytes,
    serving,
    upscale_task,
    wait_until,
)


async def assert_still_works(c: Client) -> None:
    task = upscale_task()
    items = await c.run([task])
    assert items[task["taskUUID"]][-1]["status"] == "success"


async def test_ping_before_and_after_authentication(null_server):
    async with client(null_server, key=None) as c:
        await c.send([{"taskType": "ping", "ping": True}])
        assert await c.recv() == {"data": [{"taskType": "ping", "pong": True}]}
        session = await c.auth()
        uuid.UUID(session)
        await c.send([{"taskType": "ping", "ping": True}])
        assert (await c.recv())["data"][0]["pong"] is True


async def test_tasks_before_authentication_are_refused(null_server):
    async with client(null_server, key=None) as c:
        task = upscale_task()
        error = await c.error([task])
        assert error["code"] == "notAuthenticated"
        assert error["taskUUID"] == task["taskUUID"] and error["taskType"] == "imageUpscale"
        await c.auth()
        await assert_still_works(c)


async def test_api_keys_are_checked_and_retries_allowed():
    async with (
        serving(api_keys=("right",), engine=NullEngineClient()) as server,
        client(server, key=None) as c,
    ):
        error = await c.error([{"taskType": "authentication"}])
        assert (error["code"], error["parameter"], error["taskType"]) == (
            "missingApiKey",
            "apiKey",
            "authentication",
        )
        assert "taskUUID" not in error
        error = await c.error([{"taskType": "authentication", "apiKey": "wrong"}])
        assert error["code"] == "invalidApiKey"
        await c.auth("right")
        await assert_still_works(c)


async def test_repeated_auth_failures_close_the_socket_and_limit_the_peer():
    config = GatewayConfig(port=0, api_keys=("right",), max_auth_failures=2, auth_failures_per_minute=3)
    async with serving(config, engine=NullEngineClient()) as server:
        async with client(server, key=None) as c:
            for _ in range(2):
                assert (await c.error([{"taskType": "authentication", "apiKey": "x"}]))[
                    "code"
                ] == "invalidApiKey"
            with pytest.raises(ConnectionClosed):
                await c.recv(5)
        async with client(server, key=None) as c:
            assert (await c.error([{"taskType": "authentication", "apiKey": "x"}]))["code"] == "invalidApiKey"
        async with client(server, key=None) as c:  # the peer is now over its limit, even with the right key
            error = await c.error([{"taskType": "authentication", "apiKey": "right"}])
            assert error["code"] == "rateLimitExceeded"


def test_a_public_host_without_keys_refuses_to_start():
    with pytest.raises(ValueError, match="without an API key"):
        GatewayServer(GatewayConfig(host="0.0.0.0"), NullEngineClient())


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "invalidJSON"),
        ('{"taskType": "ping"}', "invalidPayload"),
        ("[]", "invalidPayload"),
        ("[1, 2]", "invalidPayload"),
        (b"\x00binary", "invalidPayload"),
        ("[" + ",".join(['{"taskType":"ping"}'] * 257) + "]", "invalidPayload"),
    ],
    ids=["not-json", "not-array", "empty", "non-objects", "binary", "too-many"],
)
async def test_frame_errors(null_server, frame, code):
    async with client(null_server) as c:
        error = await c.error(frame)
        assert error["code"] == code
        await assert_still_works(c)


TASK_ERRORS = [
    ({"taskUUID": None}, "missingTaskUUID", "taskUUID"),
    ({"taskUUID": "not-a-uuid"}, "invalidTaskUUID", "taskUUID"),
    ({"taskType": "imageInference"}, "unsupportedTaskType", "taskType"),
    ({"model": ""}, "invalidModel", "model"),
    ({"model": "civitai:1@1"}, "invalidModel", "model"),
    ({"inputImage": None}, "missingInputImage", "inputImage"),
    ({"inputs": {"image": "x"}}, "invalidInputImage", "inputImage"),
    ({"upscaleFactor": 4}, "invalidUpscaleFactor", "upscaleFactor"),
    ({"numberResults": 2}, "unsupportedNumberResults", "numberResults"),
    ({"settings": {"steps": 0}}, "invalidSteps", "settings.steps"),
    ({"settings": {"steps": 101}}, "invalidSteps", "settings.steps"),
    ({"settings": {"steps": "5"}}, "invalidSteps", "settings.steps"),
    ({"settings": {"CFGScale": -1}}, "invalidCFGScale", "settings.CFGScale"),
    ({"settings": {"seed": -5}}, "invalidSeed", "settings.seed"),
    ({"settings": {"clipSkip": 5}}, "invalidClipSkip", "settings.clipSkip"),
    ({"settings": {"positivePrompt": 7}}, "invalidPositivePrompt", "settings.positivePrompt"),
    ({"outputType": "file"}, "invalidOutputType", "outputType"),
    ({"outputFormat": "GIF"}, "invalidOutputFormat", "outputFormat"),
    ({"outputQuality": 10}, "invalidOutputQuality", "outputQuality"),
    ({"deliveryMethod": "carrier-pigeon"}, "invalidDeliveryMethod", "deliveryMethod"),
    ({"ttl": 10}, "invalidTTL", "ttl"),
    ({"ttl": 7 * 86400 + 1}, "invalidTTL", "ttl"),  # over --max-ttl
    ({"includeCost": "yes"}, "invalidIncludeCost", "includeCost"),
    ({"inputImage": "%%% not base64 %%%"}, "invalidInputImage", "inputImage"),
    ({"inputImage": str(uuid.uuid4())}, "invalidInputImage", "inputImage"),
    ({"inputImage": data_uri(png_bytes(8, 8), "text/plain")}, "invalidInputImage", "inputImage"),
    ({"inputImage": data_uri(png_bytes(8, 8), "image/jpeg")}, "invalidInputImage", "inputImage"),
    ({"inputImage": base64.b64encode(b"just some text").decode()}, "invalidInputImage", "inputImage"),
    ({"inputImage": "http://127.0.0.1:9/x.png"}, "invalidInputImage", "inputImage"),
    ({"webhookURL": "http://10.0.0.1/hook"}, "invalidWebhookURL", "webhookURL"),
    ({"uploadEndpoint": "ftp://example.com/x"}, "invalidUploadEndpoint", "uploadEndpoint"),
]


@pytest.mark.parametrize(("change", "code", "parameter"), TASK_ERRORS, ids=[c for _, c, _ in TASK_ERRORS])
async def test_task_errors(null_server, change, code, parameter):
    task = upscale_task()
    for key, value in change.items():
        if value is None:
            task.pop(key)
        elif key == "settings":
            task["settings"].update(value)
        else:
            task[key] = value
    async with client(null_server) as c:
        await c.send([task])
        frame = await c.recv()
        assert "errors" in frame, frame
        error = frame["errors"][0]
        assert (error["code"], error["parameter"]) == (code, parameter), error
        assert error.get("taskUUID") == task.get("taskUUID")
        assert error["taskType"] == ("imageInference" if code == "unsupportedTaskType" else "imageUpscale")
        assert error.get("message")
        await assert_still_works(c)


async def test_a_ttl_up_to_the_servers_limit_is_kept(null_server):
    """``--max-ttl`` (7 days by default) bounds what a client may ask; up to it, the
    output is kept that long."""
    task = upscale_task(ttl=7 * 86400, outputType="URL")
    async with client(null_server) as c:
        item = (await c.run([task]))[task["taskUUID"]][-1]
    assert item["status"] == "success", item
    stored = await null_server.gateway.store.get(item["imageUUID"])
    assert stored is not None and stored.expires_at - null_server.gateway.store.clock() > 7 * 86400 - 60


async def test_a_frame_mixing_valid_and_invalid_tasks(null_server):
    good = [upscale_task() for _ in range(3)]
    bad = upscale_task(outputQuality=5)
    async with client(null_server) as c:
        seen = await c.run([good[0], bad, good[1], {"taskType": "ping"}, good[2]])
    for task in good:
        assert [i["status"] for i in seen[task["taskUUID"]]] == ["success"]
    assert seen[bad["taskUUID"]][0]["code"] == "invalidOutputQuality"


async def test_a_hundred_tasks_each_answered_once():
    tasks = [upscale_task() for _ in range(100)]
    async with (
        serving(max_in_flight_per_connection=100, engine=NullEngineClient()) as server,
        client(server) as c,
    ):
        seen = await c.run(tasks)
        assert await c.quiet() == []
    assert all(len(seen[t["taskUUID"]]) == 1 for t in tasks)
    assert all(seen[t["taskUUID"]][0]["status"] == "success" for t in tasks)


async def test_conflicting_task_uuid(null_server):
    task = upscale_task()
    async with client(null_server) as c:
        await c.run([task])
        error = await c.error([task])
        assert (error["code"], error["taskUUID"]) == ("conflictTaskUUID", task["taskUUID"])
        await assert_still_works(c)


async def test_in_flight_limit_per_connection():
    async with (
        serving(max_in_flight_per_connection=2, engine=NullEngineClient()) as server,
        client(server) as c,
    ):
        tasks = [upscale_task() for _ in range(5)]
        seen = await c.run(tasks)
        codes = [seen[t["taskUUID"]][0].get("code", "ok") for t in tasks]
        assert codes == ["ok", "ok", "rateLimitExceeded", "rateLimitExceeded", "rateLimitExceeded"]
        await assert_still_works(c)


async def test_uploads_count_toward_the_in_flight_limit():
    engine = HeldEngineClient()
    async with serving(max_in_flight_per_connection=2, engine=engine) as server, client(server) as c:
        upload = {
            "taskType": "imageUpload",
            "taskUUID": str(uuid.uuid4()),
            "image": data_uri(png_bytes(8, 8)),
        }
        running = [upscale_task(), upscale_task()]
        await c.send(running)
        await wait_until(lambda: len(engine.held) == 2)
        error = await c.error([upload])
        assert (error["code"], error["taskType"], error["taskUUID"]) == (
            "rateLimitExceeded",
            "imageUpload",
            upload["taskUUID"],
        )
        engine.release(stop_holding=True)
        await c.collect({t["taskUUID"] for t in running})
        upload["taskUUID"] = str(uuid.uuid4())
        (answer,) = (await c.run([upload]))[upload["taskUUID"]]  # a finished upload frees its slot
        assert answer["imageUUID"]
        assert server.gateway.state._attached and all(
            conn.in_flight == 0 for conn in server.gateway.state._attached.values()
        )
        assert not server.gateway._uploads


async def test_an_upload_is_refused_when_its_key_is_at_the_in_flight_limit():
    engine = HeldEngineClient()
    async with (
        serving(max_in_flight_per_key=2, engine=engine) as server,
        client(server) as first,
        client(server) as second,  # the same key
    ):
        await first.send([upscale_task(), upscale_task()])
        await wait_until(lambda: len(engine.held) == 2)
        upload = {
            "taskType": "imageUpload",
            "taskUUID": str(uuid.uuid4()),
            "image": data_uri(png_bytes(8, 8)),
        }
        error = await second.error([upload])
        assert (error["code"], error["taskUUID"]) == ("rateLimitExceeded", upload["taskUUID"])
        assert "API key" in error["message"]
        engine.release(stop_holding=True)


async def test_an_upload_that_fails_inside_the_gateway_is_still_answered(null_server, monkeypatch):
    async def broken(task):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(null_server.gateway, "_image_upload_frame", broken)
    async with client(null_server) as c:
        upload = {
            "taskType": "imageUpload",
            "taskUUID": str(uuid.uuid4()),
            "image": data_uri(png_bytes(8, 8)),
        }
        error = await c.error([upload])
        assert (error["code"], error["taskType"], error["taskUUID"]) == (
            "internalError",
            "imageUpload",
            upload["taskUUID"],
        )
        monkeypatch.undo()
        await assert_still_works(c)
        assert all(conn.in_flight == 0 for conn in null_server.gateway.state._attached.values())


async def test_output_types_and_formats(null_server):
    async with client(null_server) as c:
        tasks = [
            upscale_task(outputType="base64Data", outputFormat="png"),
            upscale_task(outputType="dataURI", outputFormat="WEBP"),
            upscale_task(outputType="URL", outputFormat="JPG"),
        ]
        seen = await c.run(tasks)
    b64, uri, url = (seen[t["taskUUID"]][0] for t in tasks)
    assert decode_result_image(b64).format == "PNG" and decode_result_image(b64).size == (80, 48)
    assert uri["imageDataURI"].startswith("data:image/webp;base64,")
    async with httpx.AsyncClient() as http:
        response = await http.get(url["imageURL"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert "max-age" in response.headers["cache-control"]


async def test_upload_then_upscale_by_uuid_and_reuse_outputs(null_server):
    async with client(null_server) as c:
        upload = {
            "taskType": "imageUpload",
            "taskUUID": str(uuid.uuid4()),
            "image": data_uri(png_bytes(30, 20)),
        }
        await c.send([upload])
        item = (await c.recv())["data"][0]
        assert item["taskUUID"] == upload["taskUUID"] and item["imageURL"].endswith(".png")
        first = upscale_task(item["imageUUID"])
        result = (await c.run([first]))[first["taskUUID"]][0]
        assert result["inputImageUUID"] == item["imageUUID"]
        again = upscale_task(inputs={"image": result["imageUUID"]})
        del again["inputImage"]
        second = (await c.run([again]))[again["taskUUID"]][0]
        assert decode_result_image(second).size == (120, 80)
        bad = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": data_uri(b"GIF89a-garbage")}
        error = await c.error([bad])
        assert error["taskUUID"] == bad["taskUUID"] and error["code"].startswith("invalid")


async def test_async_delivery_and_get_response_from_another_connection(null_server):
    task = upscale_task(deliveryMethod="async")
    async with client(null_server) as first, client(null_server) as second:
        await first.send([task])
        assert await first.recv() == {"data": [{"taskType": "imageUpscale", "taskUUID": task["taskUUID"]}]}
        assert await first.quiet() == []  # the result is not pushed
        await second.send([{"taskType": "getResponse", "taskUUID": task["taskUUID"]}])
        item = (await second.recv())["data"][0]
        assert item["status"] == "success" and item["taskUUID"] == task["taskUUID"]
        error = await second.error([{"taskType": "getResponse", "taskUUID": str(uuid.uuid4())}])
        assert (error["code"], error["parameter"]) == ("invalidTaskUUID", "taskUUID")
    async with client(null_server, key="another-key") as other:
        error = await other.error([{"taskType": "getResponse", "taskUUID": task["taskUUID"]}])
        assert error["code"] == "invalidTaskUUID"


async def test_http_endpoints(null_server):
    base = f"http://127.0.0.1:{null_server.port}"
    async with httpx.AsyncClient() as http:
        assert (await http.get(base + "/healthz")).status_code == 200
        assert (await http.get(base + "/readyz")).status_code == 200
        assert (await http.get(base + f"/images/{uuid.uuid4()}.png")).status_code == 404
        assert (await http.get(base + "/nothing")).status_code == 404


async def test_outputs_expire_after_their_ttl():
    clock = FakeClock()
    async with serving(engine=NullEngineClient(), clock=clock) as server, client(server) as c:
        task = upscale_task(outputType="URL", ttl=60)
        url = (await c.run([task]))[task["taskUUID"]][0]["imageURL"]
        async with httpx.AsyncClient() as http:
            assert (await http.get(url)).status_code == 200
            clock.advance(61)
            assert (await http.get(url)).status_code == 404


async def test_idle_connections_are_closed():
    async with serving(idle_timeout=0.3, engine=NullEngineClient()) as server, connect(server.url) as ws:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)


async def test_paths_and_query_strings_are_accepted(null_server):
    for path in ("/", "/v1/", "/v1?sdk=js&version=1.3.2"):
        async with connect(f"ws://127.0.0.1:{null_server.port}{path}") as ws:
            c = Client(ws)
            await c.auth()


async def test_get_response_returns_the_base64_payload_without_records_holding_it(null_server):
    task = upscale_task(deliveryMethod="async", outputType="base64Data")
    async with client(null_server) as c:
        await c.send([task])
        await c.recv()  # acknowledgement
        await asyncio.sleep(0.2)
        await c.send([{"taskType": "getResponse", "taskUUID": task["taskUUID"]}])
        item = (await c.recv())["data"][0]
    assert decode_result_image(item).size == (80, 48) and "_payload" not in item
    record = null_server.gateway.sessions.lookup("test-key", task["taskUUID"])
    assert "imageBase64Data" not in record.item


# Sessions, resume and limits, with an engine that holds results until told


async def test_a_dropped_client_resumes_and_receives_missed_results_once():
    engine = HeldEngineClient()
    async with serving(engine=engine) as server:
        tasks = [upscale_task(), upscale_task(outputType="URL")]
        async with client(server, key=None) as c:
            session = await c.auth("k1")
            await c.send(tasks)
            await wait_until(lambda: len(engine.held) == 2)
        # The socket is gone while both tasks run; they finish into the session.
        await wait_until(lambda: not server.gateway.state._attached)
        engine.release(stop_holding=True)
        await wait_until(lambda: len(server.gateway.sessions._sessions[session].replay) == 2)
        async with client(server, key=None) as c:
            assert await c.auth("k1", session) == session  # the auth reply comes first
            seen = await c.collect({t["taskUUID"] for t in tasks})
            assert await c.quiet() == []
            assert all([i["status"] for i in seen[t["taskUUID"]]] == ["success"] for t in tasks)
            await assert_still_works(c)
        async with client(server, key=None) as c:  # replayed once only
            assert await c.auth("k1", session) == session
            assert await c.quiet() == []


async def hang_up_with_a_good_and_a_bad_task(server, engine, user_agent) -> tuple[str, dict, dict]:
    """A client (key "k1") sends a task that will succeed and one that will fail, and hangs
    up while the engine holds both. Returns its session and the two tasks."""
    broken_png = data_uri(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)  # passes the gateway, fails decoding
    good, bad = upscale_task(), upscale_task(broken_png)
    async with client(server, key=None, user_agent=user_agent) as c:
        session = await c.auth("k1")
        await c.send([good, bad])
        await wait_until(lambda: len(engine.held) == 2)
    await wait_until(lambda: not server.gateway.state._attached)
    return session, good, bad


async def expect_the_good_and_the_bad(c, good: dict, bad: dict, *, error_sent: bool) -> None:
    """On the resumed socket: the good task's result, the bad one's error only if
    ``error_sent``, nothing else; getResponse has the error either way."""
    seen = await c.collect({good["taskUUID"]} | ({bad["taskUUID"]} if error_sent else set()))
    assert await c.quiet() == []
    assert seen[good["taskUUID"]][0]["status"] == "success"
    if error_sent:
        assert seen[bad["taskUUID"]][0]["code"] == "invalidInputImage"
    await c.send([{"taskType": "getResponse", "taskUUID": bad["taskUUID"]}])
    assert (await c.recv())["errors"][0]["code"] == "invalidInputImage"  # kept either way


@pytest.mark.parametrize(
    "user_agent, errors_replayed",
    [
        (None, True),
        ("runware-sdk-js/1.3.2", True),
        ("runware-python/1.8.0 (python/3.11.7; Linux x86_64) schemas/20260623192341", False),
    ],
)
async def test_missed_errors_are_replayed_except_to_clients_that_fail_every_task_on_one(
    user_agent, errors_replayed
):
    """runware-sdk already failed a dropped sync task, and an error it cannot route fails
    every task it has in flight: it gets missed results, and missed errors by getResponse."""
    engine = HeldEngineClient()
    async with serving(engine=engine) as server:
        session, good, bad = await hang_up_with_a_good_and_a_bad_task(server, engine, user_agent)
        engine.release(stop_holding=True)
        await wait_until(lambda: len(server.gateway.sessions._sessions[session].replay) == 2)
        async with client(server, key=None, user_agent=user_agent) as c:
            assert await c.auth("k1", session) == session
            await expect_the_good_and_the_bad(c, good, bad, error_sent=errors_replayed)


@pytest.mark.parametrize(
    "user_agent, errors_sent",
    [(None, True), ("runware-python/1.8.0 (python/3.11.7; Linux x86_64) schemas/20260623192341", False)],
)
async def test_an_error_finishing_after_a_resume_follows_the_same_rule(user_agent, errors_sent):
    """The task fails while the resumed socket is attached: it is sent live, or (to a
    client that fails every task on an error it cannot route) kept for getResponse."""
    engine = HeldEngineClient()
    async with serving(engine=engine) as server:
        session, good, bad = await hang_up_with_a_good_and_a_bad_task(server, engine, user_agent)
        async with client(server, key=None, user_agent=user_agent) as c:
            assert await c.auth("k1", session) == session
            engine.release(stop_holding=True)  # both finish now, live on the new socket
            await expect_the_good_and_the_bad(c, good, bad, error_sent=errors_sent)


async def test_missed_results_are_gone_after_120_s_and_never_go_to_another_key():
    clock, engine = FakeClock(), HeldEngineClient()
    async with serving(engine=engine, clock=clock) as server:
        task = upscale_task()
        async with client(server, key=None) as c:
            session = await c.auth("k1")
            await c.send([task])
            await wait_until(lambda: len(engine.held) == 1)
        await wait_until(lambda: not server.gateway.state._attached)
        engine.release(stop_holding=True)
        await wait_until(lambda: server.gateway.sessions.lookup("k1", task["taskUUID"]).finished)
        async with client(server, key=None) as c:  # another key: a fresh session, nothing replayed
            assert await c.auth("k2", session) != session
            assert await c.quiet() == []
        clock.advance(121)
        async with client(server, key=None) as c:  # expired: a fresh session, no error
            fresh = await c.auth("k1", session)
            assert fresh != session
            assert await c.quiet() == []
            await assert_still_works(c)


async def test_unknown_session_uuid_gets_a_fresh_session(null_server):
    async with client(null_server, key=None) as c:
        unknown = str(uuid.uuid4())
        assert await c.auth("k", unknown) != unknown
        await assert_still_works(c)


async def test_in_flight_limit_per_api_key_spans_connections():
    engine = HeldEngineClient()
    async with (
        serving(max_in_flight_per_key=2, engine=engine) as server,
        client(server, key="shared") as first,
        client(server, key="shared") as second,
        client(server, key="other") as other,
    ):
        running = [upscale_task(), upscale_task()]
        await first.send(running)
        await wait_until(lambda: len(engine.held) == 2)
        refused = upscale_task()
        error = await second.error([refused])
        assert (error["code"], error["taskUUID"], error["taskType"]) == (
            "rateLimitExceeded",
            refused["taskUUID"],
            "imageUpscale",
        )
        accepted = upscale_task()  # another key is not affected
        await other.send([accepted])
        await wait_until(lambda: len(engine.held) == 3)
        engine.release(stop_holding=True)
        assert (await other.collect({accepted["taskUUID"]}))[accepted["taskUUID"]][0]["status"] == "success"
        seen = await first.collect({t["taskUUID"] for t in running})
        assert all(seen[t["taskUUID"]][0]["status"] == "success" for t in running)
        await assert_still_works(second)  # the key has room again


async def test_a_full_engine_queue_is_rate_limited_for_that_task_only():
    engine = HeldEngineClient(max_queue=1)
    async with serving(engine=engine) as server, client(server) as c:
        first, second = upscale_task(), upscale_task()
        await c.send([first, second])
        frame = await c.recv()
        error = frame["errors"][0]
        assert (error["code"], error["taskUUID"]) == ("rateLimitExceeded", second["taskUUID"])
        engine.release(stop_holding=True)
        assert (await c.collect({first["taskUUID"]}))[first["taskUUID"]][0]["status"] == "success"
        await assert_still_works(c)


async def test_results_arrive_in_completion_order_not_request_order():
    engine = HeldEngineClient()
    async with serving(engine=engine) as server, client(server) as c:
        tasks = [upscale_task() for _ in range(3)]
        await c.send(tasks)
        await wait_until(lambda: len(engine.held) == 3)
        held = engine.held
        for request in reversed(held):  # the engine finishes the last one first
            engine.held = [request]
            engine.release()
            await asyncio.sleep(0.02)
        await c.collect({t["taskUUID"] for t in tasks})
        assert c.order == [t["taskUUID"] for t in reversed(tasks)]


async def test_invalid_utf8_fails_only_that_socket(null_server):
    # RFC 6455 8.1: invalid UTF-8 in a text frame fails the connection (1007); websockets
    # does it before the frame reaches the gateway, so it cannot be a JSON error.
    async with client(null_server) as c:
        await c.ws.send(b'[{"taskType":"ping","x":"\xff"}]', text=True)
        with pytest.raises(ConnectionClosed) as closed:
            await c.recv(5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007
    async with client(null_server) as c:
        await assert_still_works(c)


@pytest.mark.parametrize("task_type", ["upscale", "imageUpscale"])
async def test_every_reply_carries_the_requests_own_task_type(null_server, task_type):
    """The model page gives the response taskType as `upscale`; legacy clients send and
    expect `imageUpscale`: results, errors, progress, acknowledgements and getResponse
    items all echo what the request said."""
    sync = upscale_task(taskType=task_type, includeProgress=True)
    later = upscale_task(taskType=task_type, deliveryMethod="async")
    bad = upscale_task(taskType=task_type, outputQuality=5)
    async with client(null_server) as c:
        items = await c.run([sync])
        assert [i["taskType"] for i in items[sync["taskUUID"]]] == [task_type, task_type]
        assert items[sync["taskUUID"]][0]["status"] == "processing"
        await c.send([later])
        assert await c.recv() == {"data": [{"taskType": task_type, "taskUUID": later["taskUUID"]}]}
        await c.send([{"taskType": "getResponse", "taskUUID": later["taskUUID"]}])
        polled = (await c.recv())["data"][0]
        assert (polled["taskType"], polled["status"]) == (task_type, "success")
        error = await c.error([bad])
        assert (error["code"], error["taskType"]) == ("invalidOutputQuality", task_type)
        error = await c.error([{**upscale_task(taskType=task_type), "taskUUID": sync["taskUUID"]}])
        assert (error["code"], error["taskType"]) == ("conflictTaskUUID", task_type)


async def test_an_upscale_without_model_runs_on_the_loaded_model(null_server):
    """Runware's own sdk-js tests call upscaleGan() with no model; the hosted API accepts it."""
    task = upscale_task(taskType="upscale")
    del task["model"]
    async with client(null_server) as c:
        item = (await c.run([task]))[task["taskUUID"]][-1]
        assert (item["status"], item["taskType"]) == ("success", "upscale")
        error = await c.error([upscale_task(model="someone:else@1")])
        assert (error["code"], error["parameter"]) == ("invalidModel", "model")
