"""Fuzzing the real frame handler over a real socket with hypothesis: no exception
escapes, the server stays up, and every task that carried a valid taskUUID gets
exactly one terminal answer."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import Counter

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from engine.client import NullEngineClient
from gateway.config import GatewayConfig
from gateway.server import GatewayServer
from tests.conftest import data_uri, png_bytes

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
IMAGE = data_uri(png_bytes(16, 12))
FIELDS = {
    "model": st.sampled_from(["runware:502@1", "nope", ""]) | JSON,
    "inputImage": st.sampled_from([IMAGE, "abc", str(uuid.uuid4()), "data:text/plain;base64,QQ=="]) | JSON,
    "upscaleFactor": st.sampled_from([2, 2.0, 4, "2"]) | JSON,
    "outputType": st.sampled_from(["URL", "base64Data", "dataURI", "x"]) | JSON,
    "outputFormat": st.sampled_from(["jpg", "PNG", "webp", "GIF"]) | JSON,
    "outputQuality": st.integers(0, 120) | JSON,
    "deliveryMethod": st.sampled_from(["sync", "async", "later"]) | JSON,
    "includeProgress": st.booleans() | JSON,
    "settings": st.fixed_dictionaries(
        {},
        optional={
            "steps": st.integers(-2, 150) | JSON,
            "CFGScale": st.floats(-5, 50, allow_nan=False) | JSON,
            "seed": st.integers(-5, 2**63 - 1) | JSON,
            "clipSkip": st.integers(-1, 6) | JSON,
            "positivePrompt": st.text(max_size=30) | JSON,
        },
    )
    | JSON,
}


@st.composite
def task(draw):
    kind = draw(st.sampled_from(["upscale", "upscale", "upscale", "upload", "get", "ping", "junk"]))
    if kind == "junk":
        return draw(JSON)
    if kind == "ping":
        return {"taskType": "ping", "ping": draw(JSON)}
    item: dict = {"taskUUID": str(uuid.uuid4())}
    if kind == "upload":
        item.update(taskType="imageUpload", image=draw(st.sampled_from([IMAGE, "###"]) | JSON))
    elif kind == "get":
        item.update(taskType="getResponse")
    else:
        item["taskType"] = draw(st.sampled_from(["imageUpscale", "upscale"]))
        base = {"model": "runware:502@1", "inputImage": IMAGE, "settings": {"steps": 1}}
        item.update(base)
        for name in draw(st.lists(st.sampled_from(list(FIELDS)), unique=True, max_size=4)):
            item[name] = draw(FIELDS[name])
        for name in draw(
            st.lists(st.sampled_from(["model", "inputImage", "taskUUID"]), unique=True, max_size=1)
        ):
            item.pop(name, None)
    return item


class ServerThread:
    """The real server on its own event loop in a thread, for sync hypothesis tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        config = GatewayConfig(port=0, max_in_flight_per_connection=10_000, max_in_flight_per_key=100_000)
        self.server = GatewayServer(config, NullEngineClient())
        self.loop.run_until_complete(self.server.start())
        self.ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(grace=1), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def server_thread():
    st_ = ServerThread()
    yield st_
    st_.stop()


def test_fuzzed_frames(server_thread):
    url = server_thread.server.url
    errors: list[str] = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(task(), min_size=1, max_size=8) | JSON)
    def check(payload):
        with connect(url, max_size=2**25) as ws:
            ws.send('[{"taskType":"authentication","apiKey":"fuzz"}]')
            assert "connectionSessionUUID" in ws.recv(5)
            ws.send(_encode(payload))
            expected = (
                {t["taskUUID"] for t in payload if isinstance(t, dict) and _valid_uuid(t.get("taskUUID"))}
                if isinstance(payload, list)
                else set()
            )
            answers: Counter = Counter()
            deadline = time.monotonic() + 10
            while set(answers) < expected and time.monotonic() < deadline:
                _count(orjson.loads(ws.recv(10)), answers)
            ws.send('[{"taskType":"ping","ping":true}]')  # the socket still works, in order
            while True:
                frame = orjson.loads(ws.recv(10))
                if frame.get("data", [{}])[0].get("pong") is True:
                    break
                _count(frame, answers)
            for task_uuid in expected:
                assert answers[task_uuid] == 1, (task_uuid, answers, payload)

    check()
    assert not errors
    assert server_thread.server.gateway.ready


def _encode(payload) -> str:
    """orjson refuses integers outside 64 bits (hypothesis finds them); json does not."""
    try:
        return orjson.dumps(payload).decode()
    except TypeError:
        return json.dumps(payload)


def _valid_uuid(value) -> bool:
    try:
        uuid.UUID(value)
        return isinstance(value, str)
    except (TypeError, ValueError, AttributeError):
        return False


def _count(frame: dict, answers: Counter) -> None:
    for item in frame.get("data", []) + frame.get("errors", []):
        if item.get("status") != "processing" and "taskUUID" in item:
            answers[item["taskUUID"]] += 1
