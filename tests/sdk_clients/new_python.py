"""Drives the new `runware-sdk` (PyPI), unmodified but for its URL.

usage: python new_python.py URL API_KEY INPUT_PNG
"""

import asyncio
import base64
import io
import json
import sys

from PIL import Image
from runware import Runware


async def main(url: str, key: str, path: str) -> None:
    with open(path, "rb") as f:
        data_uri = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    summary = {}
    async with Runware(api_key=key, ws_base_url=url) as runware:
        for delivery in ("sync", "async"):
            results = await runware.run(
                {
                    "taskType": "upscale",
                    "model": "runware:502@1",
                    "inputs": {"image": data_uri},
                    "upscaleFactor": 2,
                    "outputType": "base64Data",
                    "outputFormat": "PNG",
                    "deliveryMethod": delivery,
                    "settings": {"steps": 2},
                }
            )
            data = base64.b64decode(results[0]["imageBase64Data"])
            summary[delivery] = list(Image.open(io.BytesIO(data)).size)
    print(json.dumps(summary))


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(*sys.argv[1:4]), 240))
