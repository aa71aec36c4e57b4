"""Drives the new `runware-sdk` (PyPI) over its REST transport, unmodified but for its URL.

usage: python new_python_rest.py HTTP_URL API_KEY INPUT_PNG OUT_DIR

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

from runware import RunOptions, Runware, RunwareError

MODEL = "runware:502@1"
TYPES = ("URL", "base64Data", "dataURI")
FORMATS = ("JPG", "PNG", "WEBP")


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


async def every_type_and_format(runware: Runware, data_uri: str, out_dir: str, delivery: str) -> dict:
    """One task per output type × format, all at once (each its own POST)."""
    combos = [(kind, fmt) for kind in TYPES for fmt in FORMATS]
    results = await asyncio.gather(
        *(
            runware.run(task(data_uri, outputType=kind, outputFormat=fmt, deliveryMethod=delivery))
            for kind, fmt in combos
        )
    )
    files = {}
    for (kind, fmt), items in zip(combos, results):
        name = f"{delivery}-{kind}-{fmt}"
        files[name] = {
            "file": save(out_dir, name, items[0], fmt.lower()),
            "items": len(items),
            "taskType": items[0].get("taskType"),
        }
    return files


async def main(url: str, key: str, path: str, out_dir: str) -> None:
    with open(path, "rb") as f:
        data_uri = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    summary: dict = {}
    async with Runware(api_key=key, transport="rest", http_base_url=url) as runware:
        # Sync: the POST's response is the result.
        summary["sync"] = await every_type_and_format(runware, data_uri, out_dir, "sync")
        # No deliveryMethod: the SDK sends "async", then polls getResponse.
        results = await runware.run(task(data_uri, includeCost=True))
        summary["default-async"] = {
            "file": save(out_dir, "default-async", results[0], "png"),
            "items": len(results),
            "cost": results[0].get("cost"),
            "taskType": results[0].get("taskType"),
        }
        summary["async"] = await every_type_and_format(runware, data_uri, out_dir, "async")

        # imageUpload, then an upscale of the stored image by its UUID.
        uploaded = await runware.image_upload({"image": data_uri})
        summary["upload"] = {k: uploaded[0].get(k) for k in ("imageUUID", "imageURL", "taskType")}
        results = await runware.run(task(uploaded[0]["imageUUID"], deliveryMethod="sync", outputType="URL"))
        summary["by-uuid"] = {
            "file": save(out_dir, "by-uuid", results[0], "png"),
            "inputImageUUID": results[0].get("inputImageUUID"),
        }

        # A request fault: RunwareError, classified by the server code's prefix.
        try:
            await runware.run(task(data_uri, deliveryMethod="sync", upscaleFactor=4))
            summary["error"] = "no error"
        except RunwareError as exc:
            summary["error"] = {
                "code": exc.code,
                "parameter": exc.parameter,
                "task_uuid": exc.task_uuid,
                "status": exc.status_code,
            }

    # A client time-out shorter than the task: the SDK re-POSTs the same taskUUID, which
    # attaches to the task still running (a conflictTaskUUID would fail the call).
    retries: list[str] = []
    async with Runware(
        api_key=key,
        transport="rest",
        http_base_url=url,
        debug=True,
        log_sink=lambda entry: retries.append(entry.message) if entry.category == "retry" else None,
    ) as runware:
        slow = task(data_uri, deliveryMethod="sync", settings={"steps": 60, "seed": 7})
        results = await runware.run(slow, RunOptions(timeout=150))
        summary["retried"] = {"file": save(out_dir, "retried", results[0], "png"), "retries": len(retries)}

    started = time.monotonic()
    try:
        async with Runware(api_key="not-the-key", transport="rest", http_base_url=url) as runware:
            await runware.run(task(data_uri, deliveryMethod="sync"))
        summary["bad-key"] = "no error"
    except RunwareError as exc:
        summary["bad-key"] = {"code": exc.code, "status": exc.status_code, "message": str(exc)[:200]}
    summary["bad-key-seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(*sys.argv[1:5]), 240))
