"""Drives the legacy `runware` SDK (PyPI), unmodified but for its URL.

usage: python legacy_python.py URL API_KEY INPUT_PNG OUT_DIR

Runs in the SDK's own virtualenv (only `runware` installed there). Writes every output
image it gets into OUT_DIR and prints one JSON line: for each case the file it wrote (the
test decodes them), plus what the SDK reported.
"""

import asyncio
import base64
import json
import os
import sys
import time
import urllib.request

from runware import IImageUpscale, ISettings, Runware, RunwareAPIError

MODEL = "runware:502@1"
EXTENSIONS = {"PNG": "png", "JPG": "jpg", "WEBP": "webp"}


def save(out_dir: str, name: str, image, output_format: str) -> str:
    """Decode whichever output the SDK handed back and write it to OUT_DIR/name.ext."""
    if image.imageBase64Data:
        data = base64.b64decode(image.imageBase64Data)
    elif image.imageDataURI:
        header, payload = image.imageDataURI.split(",", 1)
        assert header.startswith("data:image/") and header.endswith(";base64"), header
        data = base64.b64decode(payload)
    else:
        with urllib.request.urlopen(image.imageURL, timeout=30) as response:
            data = response.read()
    path = os.path.join(out_dir, f"{name}.{EXTENSIONS[output_format]}")
    with open(path, "wb") as f:
        f.write(data)
    return path


def upscale(image, output_type: str, output_format: str = "PNG", **extra) -> IImageUpscale:
    return IImageUpscale(
        inputImage=image,
        upscaleFactor=2,
        model=MODEL,
        outputType=output_type,
        outputFormat=output_format,
        settings=ISettings(steps=2, seed=7),
        **extra,
    )


async def bad_key(url: str) -> str:
    """A wrong key must fail the call (the SDK raises ConnectionError), not hang it."""
    client = Runware(api_key="not-the-key", url=url)
    try:
        await asyncio.wait_for(client.uploadImage("00000000-0000-4000-8000-000000000000"), 60)
    except ConnectionError as exc:
        return f"ConnectionError: {exc}"[:200]
    finally:
        await client.disconnect()
    return "no error"


async def main(url: str, key: str, path: str, out_dir: str) -> None:
    summary: dict = {}
    runware = Runware(api_key=key, url=url)
    await runware.connect()

    # imageUpload of a local PNG: the SDK reads it and sends a data URI.
    uploaded = await runware.uploadImage(path)
    summary["upload"] = {"imageUUID": uploaded.imageUUID, "imageURL": uploaded.imageURL}
    with (
        urllib.request.urlopen(uploaded.imageURL, timeout=30) as response,
        open(os.path.join(out_dir, "uploaded.png"), "wb") as f,
    ):
        f.write(response.read())

    with open(path, "rb") as f:
        data_uri = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    cases = [
        # name, inputImage, outputType, outputFormat, extra fields
        ("uuid-base64Data", uploaded.imageUUID, "base64Data", "PNG", {"includeCost": True}),
        ("datauri-dataURI", data_uri, "dataURI", "PNG", {}),
        ("uuid-URL", uploaded.imageUUID, "URL", "JPG", {}),
        # a file path: the SDK uploads it itself (imageUpload) and upscales by the new UUID
        ("path-base64Data-webp", path, "base64Data", "WEBP", {}),
    ]
    for name, image, output_type, output_format, extra in cases:
        results = await runware.imageUpscale(upscale(image, output_type, output_format, **extra))
        assert len(results) == 1, results
        result = results[0]
        summary[name] = {
            "file": save(out_dir, name, result, output_format),
            "imageUUID": result.imageUUID,
            "inputImageUUID": result.inputImageUUID,
            "taskType": result.taskType,
            "seed": result.seed,
            "cost": result.cost,
        }

    # Several at once on one connection: each result must reach its own request.
    many = await asyncio.gather(*(runware.imageUpscale(upscale(data_uri, "base64Data")) for _ in range(3)))
    summary["concurrent"] = [save(out_dir, f"concurrent-{i}", r[0], "PNG") for i, r in enumerate(many)]

    # Async delivery: an acknowledgement now, the result through getResponse.
    ack = await runware.imageUpscale(upscale(uploaded.imageUUID, "URL", deliveryMethod="async"))
    summary["async-ack"] = type(ack).__name__
    if type(ack).__name__ == "IAsyncTaskResponse":
        # The SDK drops "processing" poll answers and waits 30 s before asking again, so
        # give the task a moment before the first poll.
        await asyncio.sleep(2)
        results = await runware.getResponse(ack.taskUUID)
    else:
        results = ack
    summary["async-getResponse"] = {"file": save(out_dir, "async", results[0], "PNG")}

    # A request fault comes back as RunwareAPIError with the server's code.
    try:
        await runware.imageUpscale(
            IImageUpscale(inputImage=uploaded.imageUUID, upscaleFactor=4, model=MODEL, outputType="URL")
        )
        summary["error"] = "no error"
    except RunwareAPIError as exc:
        summary["error"] = {"code": exc.code, "data": exc.error_data}
    await runware.disconnect()

    started = time.monotonic()
    summary["bad-key"] = await bad_key(url)
    summary["bad-key-seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(*sys.argv[1:5]), 240))
