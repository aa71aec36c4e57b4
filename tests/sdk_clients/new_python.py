"""Drives the new `runware-sdk` (PyPI), unmodified but for its URL.

usage: python new_python.py URL API_KEY INPUT_PNG OUT_DIR

Runs in the SDK's own virtualenv. Writes every output image into OUT_DIR and prints one
JSON line naming the files (the test decodes them) and what the SDK reported.
"""

import asyncio
import base64
import json
import os
import sys
import time
import urllib.request

from runware import Runware, RunwareError

MODEL = "runware:502@1"


def save(out_dir: str, name: str, item: dict, ext: str) -> str:
    if item.get("imageBase64Data"):
        data = base64.b64decode(item["imageBase64Data"])
    elif item.get("imageDataURI"):
        data = base64.b64decode(item["imageDataURI"].split(",", 1)[1])
    else:
        with urllib.request.urlopen(item["imageURL"], timeout=30) as response:
            data = response.read()
    path = os.path.join(out_dir, f"{name}.{ext}")
    with open(path, "wb") as f:
        f.write(data)
    return path


def task(image: str, **fields) -> dict:
    return {
        "taskType": "upscale",
        "model": MODEL,
        "inputs": {"image": image},
        "upscaleFactor": 2,
        "outputType": "base64Data",
        "outputFormat": "PNG",
        "settings": {"steps": 2, "seed": 7},
        **fields,
    }


async def main(url: str, key: str, path: str, out_dir: str) -> None:
    with open(path, "rb") as f:
        data_uri = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    summary: dict = {}
    async with Runware(api_key=key, ws_base_url=url) as runware:
        # Sync delivery: the result is pushed on the socket.
        results = await runware.run(task(data_uri, deliveryMethod="sync", includeCost=True))
        summary["sync"] = {
            "file": save(out_dir, "sync", results[0], "png"),
            "items": len(results),
            "cost": results[0].get("cost"),
            "taskType": results[0].get("taskType"),
        }

        # No deliveryMethod: this SDK sends "async" and polls getResponse for the result.
        results = await runware.run(task(data_uri, outputType="URL", outputFormat="JPG"))
        summary["default-async"] = {
            "file": save(out_dir, "default-async", results[0], "jpg"),
            "items": len(results),
        }

        # imageUpload, then the legacy top-level inputImage field with the stored UUID.
        uploaded = await runware.image_upload({"image": data_uri})
        summary["upload"] = {k: uploaded[0].get(k) for k in ("imageUUID", "imageURL", "taskType")}
        by_uuid = task(
            uploaded[0]["imageUUID"], deliveryMethod="sync", outputType="dataURI", outputFormat="WEBP"
        )
        by_uuid.pop("inputs")
        by_uuid["inputImage"] = uploaded[0]["imageUUID"]
        results = await runware.run(by_uuid)
        summary["uuid-dataURI"] = {
            "file": save(out_dir, "uuid-dataURI", results[0], "webp"),
            "inputImageUUID": results[0].get("inputImageUUID"),
        }

        # Several at once: each result must reach its own request.
        many = await asyncio.gather(*(runware.run(task(data_uri, deliveryMethod="sync")) for _ in range(3)))
        summary["concurrent"] = [save(out_dir, f"concurrent-{i}", r[0], "png") for i, r in enumerate(many)]

        # A request fault: RunwareError, classified by the server code's prefix.
        try:
            await runware.run(task(data_uri, deliveryMethod="sync", upscaleFactor=4))
            summary["error"] = "no error"
        except RunwareError as exc:
            summary["error"] = {"code": exc.code, "parameter": exc.parameter, "task_uuid": exc.task_uuid}

        # The socket still works after the error.
        results = await runware.run(task(data_uri, deliveryMethod="sync"))
        summary["after-error"] = {"file": save(out_dir, "after-error", results[0], "png")}

    started = time.monotonic()
    try:
        async with Runware(api_key="not-the-key", ws_base_url=url, max_reconnect_attempts=0) as runware:
            await runware.run(task(data_uri, deliveryMethod="sync"))
        summary["bad-key"] = "no error"
    except RunwareError as exc:
        summary["bad-key"] = {"code": exc.code, "message": str(exc)[:200]}
    summary["bad-key-seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(*sys.argv[1:5]), 240))
