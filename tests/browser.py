"""A real headless browser for the playground's tests and screenshot: Debian's ``chromium``
driven by Playwright for Python (never ``playwright install``, which downloads browsers).

:func:`require_chromium` skips a test when the browser (or Playwright) is missing, with
the command that installs it, and fails it instead when ``CI=true``. :class:`Playground`
drives the page through its ``data-testid`` hooks and records what crosses the wire
(WebSocket frames both ways, HTTP requests) and the console's errors.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from PIL import Image, ImageDraw

INSTALL = "apt-get install -y --no-install-recommends chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # running as root (in containers) Chromium needs it
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def chromium_path() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def require_chromium() -> str:
    """The browser's path; skips the test if it is missing (fails it when CI=true)."""
    problem = None
    path = chromium_path()
    if path is None:
        problem = f"Debian's chromium is not installed: {INSTALL}"
    else:
        try:
            import playwright.async_api  # noqa: F401
        except ImportError:
            problem = 'Playwright for Python is not installed: pip install -e ".[test]"'
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    return path


async def launch(playwright):
    return await playwright.chromium.launch(
        executable_path=require_chromium(), headless=True, args=CHROMIUM_ARGS
    )


def picture(width: int, height: int, *, alpha: bool = False, seed: int = 0) -> bytes:
    """A small PNG with shapes on a gradient (so a before/after shows something)."""
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for i in range(4):
        x, y = (seed * 7 + i * width // 4) % width, (seed * 5 + i * height // 3) % height
        draw.ellipse(
            (x, y, x + width // 3, y + height // 3), fill=((60 * i + seed * 40) % 256, 120, 200 - 40 * i)
        )
    if alpha:
        mask = Image.linear_gradient("L").rotate(90).resize((width, height))
        image.putalpha(mask)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def upload(name: str, data: bytes, mime: str = "image/png") -> dict:
    return {"name": name, "mimeType": mime, "buffer": data}


@dataclass
class Wire:
    """What the page sent and received on its WebSockets, and its HTTP requests."""

    sockets: list[str] = field(default_factory=list)  # URLs, in opening order
    sent: list[object] = field(default_factory=list)  # parsed frames
    received: list[dict] = field(default_factory=list)
    requests: list[tuple[str, dict]] = field(default_factory=list)  # (url, headers)
    console_errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    def sent_tasks(self, task_type: str | None = None) -> list[dict]:
        tasks = [t for frame in self.sent if isinstance(frame, list) for t in frame]
        return [t for t in tasks if task_type is None or t.get("taskType") == task_type]

    def items_for(self, task_uuid: str) -> list[dict]:
        return [
            item
            for frame in self.received
            for item in frame.get("data", []) + frame.get("errors", [])
            if item.get("taskUUID") == task_uuid
        ]


class Playground:
    """One browser page on the playground, with its wire recorded."""

    def __init__(self, page, base_url: str) -> None:
        self.page = page
        self.base_url = base_url
        self.wire = Wire()
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.wire.console_errors.append(f"page error: {error}"))
        page.on("request", lambda request: self.wire.requests.append((request.url, request.headers)))
        page.on("websocket", self._socket)

    def _console(self, message) -> None:
        self.wire.console.append(message.text)
        if message.type == "error":
            self.wire.console_errors.append(message.text)

    def _socket(self, ws) -> None:
        self.wire.sockets.append(ws.url)
        ws.on("framesent", lambda payload: self.wire.sent.append(orjson.loads(payload)))
        ws.on("framereceived", lambda payload: self.wire.received.append(orjson.loads(payload)))

    def hook(self, testid: str):
        return self.page.get_by_test_id(testid)

    async def open(self, path: str = "/") -> None:
        await self.page.goto(self.base_url + path)
        await self.page.wait_for_function("document.readyState === 'complete'")

    async def connect(self, key: str, *, expect: str = "connected") -> None:
        await self.hook("api-key").fill(key)
        await self.hook("api-key").press("Enter")  # the keyboard's way; the button does the same
        await self.page.wait_for_selector(f"body[data-connection='{expect}']")

    async def settings(self, **values: str | int) -> None:
        for name, value in values.items():
            field_ = self.page.locator(f"#settings [name='{name}']")
            if await field_.evaluate("e => e.tagName") == "SELECT":
                await field_.select_option(str(value))
            else:
                await field_.fill(str(value))

    async def add_files(self, *files: dict) -> None:
        await self.hook("file-input").set_input_files(list(files))

    async def cards_by_name(self, count: int, timeout: float = 30) -> dict[str, str]:
        """{file name: taskUUID} once ``count`` cards exist."""
        await self.page.wait_for_function(
            f"document.querySelectorAll('[data-testid=task-card]').length >= {count}", timeout=timeout * 1000
        )
        return await self.page.eval_on_selector_all(
            "[data-testid=task-card]",
            "cards => Object.fromEntries(cards.map(c => [c.querySelector('.name').textContent, c.dataset.taskUuid]))",
        )

    def card(self, task_uuid: str):
        return self.page.locator(f"[data-testid=task-card][data-task-uuid='{task_uuid}']")

    async def wait_ended(self, task_uuid: str, timeout: float = 60) -> str:
        """The card's final status (done or error), once it has one."""
        selector = f"[data-task-uuid='{task_uuid}']:is([data-status=done], [data-status=error])"
        await self.page.wait_for_selector(selector, timeout=timeout * 1000)
        return await self.card(task_uuid).get_attribute("data-status")

    async def result_size(self, task_uuid: str) -> tuple[int, int]:
        """The natural size of the card's result image, once loaded."""
        image = self.card(task_uuid).get_by_test_id("result-image")
        handle = await image.element_handle()
        await self.page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=handle)
        width, height = await image.evaluate("i => [i.naturalWidth, i.naturalHeight]")
        return width, height

    async def quiet(self, seconds: float = 0.5) -> None:
        await asyncio.sleep(seconds)


async def wait_for(condition, timeout: float = 10.0, step: float = 0.005) -> None:
    """Poll ``condition()`` on the event loop (the server's too) until true."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(step)
