"""The I/O-free parts: frame parsing, sessions and the image store, with bytes and a
hand-moved clock."""

from __future__ import annotations

import uuid

import pytest

from gateway.errors import TaskError
from gateway.images import MemoryImageStore
from gateway.protocol import Upscale, parse_frame
from gateway.session import SessionStore
from tests.conftest import FakeClock


def test_parse_frame_returns_models_and_errors_in_order():
    good = {"taskType": "upscale", "taskUUID": str(uuid.uuid4()), "model": "m", "inputImage": "x"}
    out = parse_frame(
        f'[{{"taskType":"ping"}}, {{"taskType":"nope","taskUUID":"u"}}, {__import__("json").dumps(good)}]'
    )
    assert [type(x).__name__ for x in out] == ["Ping", "TaskError", "Upscale"]
    assert out[1].code == "unsupportedTaskType" and out[1].task_uuid == "u"
    assert isinstance(out[2], Upscale) and out[2].outputFormat == "JPG" and out[2].settings.steps == 20


@pytest.mark.parametrize(("value", "expected"), [("jpeg", "JPG"), ("png", "PNG"), ("Webp", "WEBP")])
def test_output_format_is_case_insensitive(value, expected):
    task = {
        "taskType": "imageUpscale",
        "taskUUID": str(uuid.uuid4()),
        "model": "m",
        "inputImage": "x",
        "outputFormat": value,
    }
    assert parse_frame(__import__("orjson").dumps([task]).decode())[0].outputFormat == expected


def test_sessions_resume_only_for_their_key_and_expire():
    clock = FakeClock()
    store = SessionStore(session_ttl=120, clock=clock)
    session, replay = store.open("k", None)
    assert replay == []
    store.detach(session)
    store.keep(session, b"frame-1")
    resumed, replay = store.open("k", session.session_id)
    assert resumed is session and replay == [b"frame-1"]
    store.detach(session)
    store.keep(session, b"frame-2")
    other, replay = store.open("other-key", session.session_id)
    assert other is not session and replay == []
    clock.advance(121)
    fresh, replay = store.open("k", session.session_id)
    assert fresh is not session and replay == []


def test_task_records_conflict_finish_once_and_expire():
    clock = FakeClock()
    store = SessionStore(record_ttl=3600, clock=clock)
    session, _ = store.open("k", None)
    record = store.register("k", session, "t1", "imageUpscale", False)
    with pytest.raises(TaskError) as err:
        store.register("k", session, "t1", "imageUpscale", False)
    assert err.value.code == "conflictTaskUUID"
    with pytest.raises(TaskError) as err:  # taskUUIDs are unique across keys too
        store.register("other", session, "t1", "imageUpscale", False)
    assert err.value.code == "conflictTaskUUID"
    assert store.lookup("other", "t1") is None  # and only their own key reads them
    assert store.running("k") == 1 and store.running("other") == 0
    assert store.finish(record, item={"ok": 1}) and not store.finish(record, item={"ok": 2})
    assert store.running("k") == 0 and store.lookup("k", "t1").item == {"ok": 1}
    clock.advance(3601)
    assert store.lookup("k", "t1") is None
    store.register("other", session, "t1", "imageUpscale", False)  # forgotten: free again


def test_a_forgotten_record_frees_its_uuid_and_transient_sessions_keep_nothing():
    store = SessionStore()
    session = store.transient()
    record = store.register("k", session, "t1", "imageUpscale", False)
    store.finish(record, error=TaskError("rateLimitExceeded", "busy"))
    store.forget(record)
    assert store.lookup("k", "t1") is None
    again = store.register("k", session, "t1", "imageUpscale", False)
    assert store.lookup("k", "t1") is again
    store.keep(session, b"frame")
    assert not session.resumable and not session.replay
    resumed, replay = store.open("k", session.session_id)  # never resumed
    assert resumed is not session and replay == []


def test_image_store_ttl_and_byte_budget():
    clock = FakeClock()
    store = MemoryImageStore(max_bytes=100, clock=clock)
    a = store.put_now(b"a" * 40, "image/png", ttl=10)
    b = store.put_now(b"b" * 40, "image/png", ttl=1000)
    assert store.get_now(a.image_uuid).data == b"a" * 40
    clock.advance(11)
    c = store.put_now(b"c" * 40, "image/png", ttl=1000)  # over budget: the expired one goes first
    assert store.get_now(a.image_uuid) is None and store.get_now(b.image_uuid) and store.get_now(c.image_uuid)
    d = store.put_now(b"d" * 40, "image/png", ttl=1000)  # then the oldest
    assert store.get_now(b.image_uuid) is None and store.get_now(d.image_uuid)
    assert store.bytes <= 100


def test_expired_images_are_swept_without_being_asked_for():
    clock = FakeClock()
    store = MemoryImageStore(max_bytes=10**9, clock=clock)
    old = store.put_now(b"x" * 1000, "image/png", ttl=5)
    clock.advance(6)
    store.put_now(b"y", "image/png", ttl=5)
    assert old.image_uuid not in store._images and store.bytes == 1


def test_finished_records_expire_even_behind_a_running_one():
    clock = FakeClock()
    store = SessionStore(record_ttl=60, clock=clock)
    session, _ = store.open("k", None)
    store.register("k", session, "long", "imageUpscale", False)  # still running at the end
    quick = store.register("k", session, "quick", "imageUpscale", False)
    store.finish(quick, item={})
    clock.advance(61)
    assert store.lookup("k", "quick") is None
    assert store.lookup("k", "long") is not None and store.running("k") == 1


def test_records_stay_bounded_after_expiry_and_over_the_cap():
    clock = FakeClock()
    store = SessionStore(record_ttl=60, max_records=3, clock=clock)
    session, _ = store.open("k", None)
    for i in range(3):
        store.finish(store.register("k", session, f"old{i}", "imageUpscale", False), item={})
    clock.advance(61)
    for i in range(5):  # the expired ones are gone; the cap then drops the oldest finished
        store.finish(store.register("k", session, f"new{i}", "imageUpscale", False), item={})
    assert [store.lookup("k", f"new{i}") is not None for i in range(5)] == [False, False, True, True, True]
    assert len(store._records) == len(store._finished) == 3


def test_an_array_without_any_object_is_one_frame_error():
    error = parse_frame("[1, 2, [3]]")
    assert isinstance(error, TaskError) and error.code == "invalidPayload"
    mixed = parse_frame('[1, {"taskType": "ping"}]')  # a task among junk is still answered
    assert [type(x).__name__ for x in mixed] == ["TaskError", "Ping"]


def test_an_expired_session_keeps_no_frames():
    clock = FakeClock()
    store = SessionStore(session_ttl=120, clock=clock)
    session, _ = store.open("k", None)
    store.detach(session)
    store.keep(session, b"kept")
    clock.advance(121)
    store.expire()
    assert session.expired and not session.replay
    store.keep(session, b"late result")  # a task that outlived its session
    assert not session.replay


class _BlockingSocket:
    """Stands in for a websockets connection whose peer reads only when told to."""

    remote_address = ("127.0.0.1", 1)

    def __init__(self) -> None:
        import asyncio

        self.sent: list[bytes] = []
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def send(self, frame, text=True):
        self.started.set()
        await self.gate.wait()
        self.sent.append(frame)

    async def close(self, *args):
        pass


def _connection(ws):
    from types import SimpleNamespace

    from gateway.config import GatewayConfig
    from gateway.connection import AuthLimiter, Connection
    from gateway.state import LocalState

    store = SessionStore()
    gateway = SimpleNamespace(config=GatewayConfig(), state=LocalState(store), spawn=lambda coro: coro.close())
    connection = Connection(ws, gateway, AuthLimiter(10))
    connection.session, _ = store.open("k", None)
    return connection


async def test_a_pong_goes_ahead_of_queued_results():
    import asyncio

    from gateway.connection import _PONG

    ws = _BlockingSocket()
    connection = _connection(ws)
    writer = asyncio.create_task(connection._writer())
    connection.send(b"r1")
    connection.send(b"r2")
    await ws.started.wait()  # r1 is being written
    await connection.handle('[{"taskType":"ping","ping":true}]')
    ws.gate.set()
    while len(ws.sent) < 3:
        await asyncio.sleep(0.01)
    writer.cancel()
    assert ws.sent == [b"r1", _PONG, b"r2"]


async def test_unsent_frames_go_back_to_the_session_in_order_without_pongs():
    import asyncio

    ws = _BlockingSocket()
    connection = _connection(ws)
    writer = asyncio.create_task(connection._writer())
    connection.send(b"r1")
    connection.send(b"r2")
    await ws.started.wait()  # r1 left the queue but was never fully sent
    await connection.handle('[{"taskType":"ping","ping":true}]')
    writer.cancel()
    connection._return_unsent()
    assert list(connection.session.replay) == [b"r1", b"r2"]


def test_image_expiry_follows_each_ttl_and_skips_replaced_entries():
    clock = FakeClock()
    store = MemoryImageStore(clock=clock)
    long = store.put_now(b"l", "image/png", ttl=100)
    short = store.put_now(b"s", "image/png", ttl=5)  # put later, expires first
    renewed = store.put_now(b"r", "image/png", ttl=5)
    store.put_now(b"r2", "image/png", ttl=100, image_uuid=renewed.image_uuid)  # replaced: new TTL
    clock.advance(6)
    store.put_now(b"x", "image/png", ttl=100)  # a put sweeps what has expired
    assert short.image_uuid not in store._images
    assert store.get_now(long.image_uuid) and store.get_now(renewed.image_uuid).data == b"r2"
    assert store.bytes == 4
