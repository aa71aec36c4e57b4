"""Regenerate docs/playground.png: the playground with finished results (and one error),
served by the real server in this process and shot in Debian's headless chromium.

    python docs/playground_screenshot.py                      # tiny model, 1280x800
    python docs/playground_screenshot.py --model /path/to/sd-x2-latent-upscaler --steps 20
    python docs/playground_screenshot.py --width 390 --height 844 --out /tmp/phone.png

The tiny test model has random weights, so its "upscales" are noise; a real model's
folder gives a screenshot with real results. tests/test_playground.py runs this with
--out in a temporary folder, so it cannot rot.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.client import InprocEngineClient  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from gateway.config import GatewayConfig  # noqa: E402
from gateway.server import GatewayServer  # noqa: E402
from tests.browser import INSTALL, Playground, chromium_path, launch, picture, upload  # noqa: E402

KEY = "screenshot-key"


async def shoot(
    browser, base_url: str, out: Path, *, width: int, height: int, steps: int, key: str = KEY
) -> dict:
    """Finish a few tasks (and fail one) on the page, then write the screenshot to ``out``.
    Returns the live panel's figures as shown."""
    context = await browser.new_context(viewport={"width": width, "height": height})
    page = Playground(await context.new_page(), base_url)
    await page.open("/")
    await page.connect(key)
    await page.settings(steps=steps, outputFormat="PNG", positivePrompt="a sharp photo")
    files = [
        upload("gradient.png", picture(64, 64, seed=1)),
        upload("portrait.png", picture(48, 72, seed=2)),
        upload("alpha.png", picture(64, 64, alpha=True, seed=3)),
        upload("notes.txt", b"not an image\n", "text/plain"),
    ]
    await page.add_files(*files)
    cards = await page.cards_by_name(len(files))
    for task_uuid in cards.values():
        await page.wait_ended(task_uuid, timeout=600)
    for name, task_uuid in cards.items():
        if name.endswith(".png"):
            await page.result_size(task_uuid)
    # Let the live panel take two /stats reads after the work, so it shows rates.
    await page.page.wait_for_function("document.getElementById('stat-rows').textContent !== '—'")
    await asyncio.sleep(2.5)
    await page.page.evaluate("document.activeElement?.blur()")
    out.parent.mkdir(parents=True, exist_ok=True)
    await page.page.screenshot(path=str(out), full_page=True)
    panel = {hook: await page.hook(hook).text_content() for hook in ("throughput", "rows-per-call")}
    await context.close()
    if page.wire.console_errors:
        raise RuntimeError(f"the page logged errors: {page.wire.console_errors}")
    return panel


async def main(args: argparse.Namespace) -> None:
    from playwright.async_api import async_playwright

    engine = EngineConfig(model=args.model, device=args.device)
    config = GatewayConfig(port=0, api_keys=(KEY,), engine=engine)
    async with GatewayServer(config, InprocEngineClient(engine)) as server, async_playwright() as pw:
        browser = await launch(pw)
        try:
            base = f"http://127.0.0.1:{server.port}"
            await shoot(browser, base, args.out, width=args.width, height=args.height, steps=args.steps)
        finally:
            await browser.close()
    print(f"wrote {args.out}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "playground.png", help="where to write")
    parser.add_argument("--model", default="tiny", help="model to serve (default: the tiny test model)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per image")
    parser.add_argument("--width", type=int, default=1280, help="viewport width")
    parser.add_argument("--height", type=int, default=800, help="viewport height")
    return parser.parse_args(argv)


if __name__ == "__main__":
    if chromium_path() is None:
        sys.exit(f"Debian's chromium is needed: {INSTALL}")
    asyncio.run(main(parse_args()))
