"""The official `runware` SDK (legacy, PyPI 0.5.24) upscaling a folder the way its users
would: one ``imageUpscale`` call per image, all at once with ``asyncio.gather``, each
output written to disk. The other half of ``benchmarks/cli_upscale.py``.

    python sdk_legacy_upscale.py URL API_KEY IN_DIR OUT_DIR STEPS

Runs under the SDK's own interpreter (only ``runware`` installed there). Prints one JSON
line: images written, failures (the first few), and seconds from connecting to the last
write.
"""

import asyncio
import base64
import json
import os
import sys
import time

from runware import IImageUpscale, ISettings, Runware


async def main(url: str, key: str, in_dir: str, out_dir: str, steps: int) -> None:
    names = sorted(n for n in os.listdir(in_dir) if n.endswith(".png"))
    started = time.monotonic()
    runware = Runware(api_key=key, url=url)
    await runware.connect()

    async def one(name: str) -> None:
        [image] = await runware.imageUpscale(
            IImageUpscale(
                inputImage=os.path.join(in_dir, name),
                upscaleFactor=2,
                model="runware:502@1",
                outputType="base64Data",
                outputFormat="PNG",
                settings=ISettings(steps=steps),
            )
        )
        with open(os.path.join(out_dir, name[:-4] + ".2x.png"), "wb") as f:
            f.write(base64.b64decode(image.imageBase64Data))

    results = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
    seconds = time.monotonic() - started
    failures = [repr(r)[:200] for r in results if isinstance(r, BaseException)]
    print(json.dumps({"images": len(names) - len(failures), "failures": failures[:5], "seconds": seconds}))
    await runware.disconnect()


if __name__ == "__main__":
    url, key, in_dir, out_dir, steps = sys.argv[1:6]
    asyncio.run(main(url, key, in_dir, out_dir, int(steps)))
