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
    store.register("other", session, "t1", "imageUpscale", False)  # another key: no conflict
    assert store.running("k") == 1
    assert store.finish(record, item={"ok": 1}) and not store.finish(record, item={"ok": 2})
    assert store.running("k") == 0 and store.lookup("k", "t1").item == {"ok": 1}
    clock.advance(3601)
    assert store.lookup("k", "t1") is None


def test_image_store_ttl_and_byte_budget():
    clock = FakeClock()
    store = MemoryImageStore(max_bytes=100, clock=clock)
    a = store.put(b"a" * 40, "image/png", ttl=10)
    b = store.put(b"b" * 40, "image/png", ttl=1000)
    assert store.get(a.image_uuid).data == b"a" * 40
    clock.advance(11)
    c = store.put(b"c" * 40, "image/png", ttl=1000)  # over budget: the expired one goes first
    assert store.get(a.image_uuid) is None and store.get(b.image_uuid) and store.get(c.image_uuid)
    d = store.put(b"d" * 40, "image/png", ttl=1000)  # then the oldest
    assert store.get(b.image_uuid) is None and store.get(d.image_uuid)
    assert store.bytes <= 100


def test_expired_images_are_swept_without_being_asked_for():
    clock = FakeClock()
    store = MemoryImageStore(max_bytes=10**9, clock=clock)
    old = store.put(b"x" * 1000, "image/png", ttl=5)
    clock.advance(6)
    store.put(b"y", "image/png", ttl=5)
    assert old.image_uuid not in store._images and store.bytes == 1
