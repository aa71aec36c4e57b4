"""Drives the legacy `runware` SDK (PyPI), unmodified but for its URL.

usage: python legacy_python.py URL API_KEY INPUT_PNG
Prints a JSON summary: the output size of each case.
"""

import asyncio
import base64
import io
import json
import sys
import urllib.request

from PIL import Image
from runware import IImageUpscale, ISettings, Runware


def size_of(image) -> list[int]:
    if image.imageBase64Data:
        data = base64.b64decode(image.imageBase64Data)
    elif image.imageDataURI:
        data = base64.b64decode(image.imageDataURI.split(",", 1)[1])
    else:
        with urllib.request.urlopen(image.imageURL, timeout=30) as response:
            data = response.read()
    return list(Image.open(io.BytesIO(data)).size)


async def main(url: str, key: str, path: str) -> None:
    runware = Runware(api_key=key, url=url)
    await runware.connect()
    uploaded = await runware.uploadImage(path)
    with open(path, "rb") as f:
        data_uri = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    summary = {"uploaded": uploaded.imageUUID}
    cases = [
        ("uuid-base64Data", uploaded.imageUUID, "base64Data"),
        ("datauri-dataURI", data_uri, "dataURI"),
        ("uuid-URL", uploaded.imageUUID, "URL"),
    ]
    for name, image, output_type in cases:
        results = await runware.imageUpscale(
            IImageUpscale(
                inputImage=image,
                upscaleFactor=2,
                model="runware:502@1",
                outputType=output_type,
                outputFormat="PNG",
                settings=ISettings(steps=2),
            )
        )
        summary[name] = size_of(results[0])
    async_result = await runware.imageUpscale(
        IImageUpscale(
            inputImage=uploaded.imageUUID,
            upscaleFactor=2,
            model="runware:502@1",
            outputType="URL",
            deliveryMethod="async",
            settings=ISettings(steps=2),
        )
    )
    summary["async"] = type(async_result).__name__
    await runware.disconnect()
    print(json.dumps(summary))


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(*sys.argv[1:4]), 240))
