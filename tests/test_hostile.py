"""Hostile and odd input: every case gets its specific answer, and the same connection
then completes a valid task. Faults: slow readers, shutdown, fuzzed frames."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import uuid

import numpy as np
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed

from engine.client import NullEngineClient
from tests.conftest import client, data_uri, decode_result_image, serving, upscale_task
from tests.test_codecs import bomb_png
from tests.test_gateway import assert_still_works


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), (80 * i, 0, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


NOISE = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8)), "PNG")

# (input bytes, expected code or None for success, expected output size)
IMAGES = {
    "non-image bytes": (b"%PDF-1.4 definitely not an image", "invalidInputImage", None),
    "truncated png": (NOISE[: len(NOISE) // 2], "invalidInputImage", None),
    "decompression bomb": (bomb_png(20000, 20000), "invalidImageSize", None),
    "zero-sized png": (bomb_png(0, 0), "invalidInputImage", None),
    "one pixel": (encode(Image.new("RGB", (1, 1)), "PNG"), "invalidImageDimensions", None),
    "animated gif": (animated_gif(), "invalidInputImage", None),
    "cmyk jpeg": (encode(Image.new("CMYK", (20, 10), (0, 50, 100, 0)), "JPEG"), None, (40, 20)),
    "16-bit png": (encode(Image.fromarray(np.full((10, 20), 30000, np.uint16)), "PNG"), None, (40, 20)),
    "grayscale": (encode(Image.new("L", (20, 10), 90), "PNG"), None, (40, 20)),
    "palette with transparency": (encode(Image.new("P", (20, 10), 1), "PNG", transparency=1), None, (40, 20)),
    "exif rotated jpeg": (
        encode(
            Image.new("RGB", (20, 10)),
            "JPEG",
            exif=(lambda e: (e.__setitem__(0x0112, 6), e)[1])(Image.Exif()),
        ),
        None,
        (20, 40),
    ),
    "bmp": (encode(Image.new("RGB", (20, 10)), "BMP"), None, (40, 20)),
}


@pytest.mark.parametrize("name", list(IMAGES))
async def test_image_inputs(null_server, name):
    data, code, size = IMAGES[name]
    task = upscale_task(base64.b64encode(data).decode())
    async with client(null_server) as c:
        item = (await c.run([task]))[task["taskUUID"]][-1]
        if code is None:
            assert item["status"] == "success", item
            assert decode_result_image(item).size == size
        else:
            assert (item["code"], item["parameter"], item["taskUUID"]) == (
                code,
                "inputImage",
                task["taskUUID"],
            )
        await assert_still_works(c)


async def test_inputs_image_field_is_named_in_errors(null_server):
    task = upscale_task(inputs={"image": base64.b64encode(b"garbage!").decode()})
    del task["inputImage"]
    async with client(null_server) as c:
        item = (await c.run([task]))[task["taskUUID"]][-1]
    assert (item["code"], item["parameter"]) == ("invalidInputImage", "inputs.image")


async def test_an_expired_upload_is_refused(null_server):
    async with client(null_server) as c:
        upload = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": data_uri(NOISE)}
        await c.send([upload])
        image_uuid = (await c.recv())["data"][0]["imageUUID"]
        null_server.gateway.store._images[image_uuid] = null_server.gateway.store._images[
            image_uuid
        ].__class__(image_uuid, NOISE, "image/png", 0.0)
        task = upscale_task(image_uuid)
        error = (await c.run([task]))[task["taskUUID"]][-1]
        assert error["code"] == "invalidInputImage" and "expired" in error["message"]
        await assert_still_works(c)


async def test_a_frame_over_the_size_limit_closes_only_that_socket():
    async with serving(max_frame_bytes=4096, engine=NullEngineClient()) as server:
        async with client(server) as c:
            await c.send([upscale_task(data_uri(NOISE * 10))])
            with pytest.raises(ConnectionClosed, match=r"1009|message too big"):
                await c.recv(5)
        async with client(server) as c:
            await assert_still_works(c)


async def test_keys_are_never_logged(caplog):
    caplog.set_level(logging.DEBUG)
    from gateway.config import GatewayConfig

    config = GatewayConfig(port=0, api_keys=("s3cret-right",))
    async with serving(config, NullEngineClient()) as server, client(server, key=None) as c:
        await c.error([{"taskType": "authentication", "apiKey": "s3cret-wrong"}])
        await c.auth("s3cret-right")
        await assert_still_works(c)
    server_side = [r for r in caplog.records if not r.name.startswith("websockets.client")]
    assert server_side and not any("s3cret" in r.getMessage() for r in server_side)


async def test_a_client_that_stops_reading_is_dropped_and_its_results_kept():
    big = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 300, 3), np.uint8)), "PNG")
    async with serving(send_queue_frames=4, send_timeout=2, engine=NullEngineClient()) as server:
        gateway = server.gateway
        tasks = [upscale_task(data_uri(big)) for _ in range(24)]
        async with client(server, key=None) as c:
            session = await c.auth("reader")
            c.ws.transport.pause_reading()  # stop reading: results pile up on the server
            await c.send(tasks)
            for _ in range(500):
                if not gateway.state._attached:
                    break
                await asyncio.sleep(0.02)
            assert not gateway.state._attached, "the slow reader was not dropped"
        for _ in range(500):  # everything finishes, delivered or kept
            if all(gateway.sessions.lookup("reader", t["taskUUID"]).finished for t in tasks):
                break
            await asyncio.sleep(0.02)
        kept = len(gateway.sessions._sessions[session].replay)
        assert kept > 0
        async with client(server, key=None) as c:
            assert await c.auth("reader", session) == session
            frames = [await c.recv() for _ in range(kept)]
            assert await c.quiet(0.5) == []
        uuids = [f["data"][0]["taskUUID"] for f in frames]
        assert len(set(uuids)) == kept and set(uuids) <= {t["taskUUID"] for t in tasks}
        assert all(f["data"][0]["status"] == "success" for f in frames)
