"""The web playground, in a real headless browser (Debian's chromium via Playwright)
against the real server with the tiny model, served in this test's event loop (so a
test can drop a socket from the server side mid-task).

Without chromium these tests skip locally (fail when CI=true): apt-get install -y
--no-install-recommends chromium. The HTTP-only checks at the end need no browser.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import httpx
import orjson
import pytest
import pytest_asyncio
from PIL import Image
from websockets.asyncio.client import connect

from engine.client import InprocEngineClient
from gateway.config import GatewayConfig
from tests.browser import Playground, launch, picture, require_chromium, upload, wait_for
from tests.conftest import TINY, serving

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = "playground-key"
ROOT = Path(__file__).resolve().parent.parent


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server():
    config = GatewayConfig(port=0, api_keys=(KEY,), engine=TINY, max_steps=400)
    async with serving(config, InprocEngineClient(TINY)) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser():
    require_chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await launch(playwright)
        yield browser
        await browser.close()


@pytest_asyncio.fixture(loop_scope="module")
async def playground(browser, server):
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = Playground(await context.new_page(), f"http://127.0.0.1:{server.port}")
    await page.open("/")  # a browser's plain GET / lands on the playground
    yield page
    await context.close()
    assert not page.wire.console_errors, page.wire.console_errors


async def test_three_sizes_come_back_exactly_twice_the_size(playground):
    await playground.connect(KEY)
    await playground.settings(steps=2, outputFormat="PNG")
    sizes = {"wide.png": (48, 24), "tall.png": (20, 52), "alpha.png": (37, 41)}
    await playground.add_files(
        *(upload(name, picture(w, h, alpha=name == "alpha.png")) for name, (w, h) in sizes.items())
    )
    cards = await playground.cards_by_name(3)
    for name, (w, h) in sizes.items():
        assert await playground.wait_ended(cards[name]) == "done"
        assert await playground.result_size(cards[name]) == (2 * w, 2 * h)
    # The download link is the PNG itself, alpha kept.
    href = await playground.card(cards["alpha.png"]).get_by_test_id("download").get_attribute("href")
    async with httpx.AsyncClient() as http:
        image = Image.open(io.BytesIO((await http.get(href)).content))
    assert (image.format, image.mode, image.size) == ("PNG", "RGBA", (74, 82))
    # What the page sent: upscale tasks with every setting it shows, progress and cost asked for.
    [task] = playground.wire.sent_tasks("upscale")[:1]
    assert task["outputType"] == "URL" and task["includeProgress"] is True and task["includeCost"] is True
    assert task["settings"]["steps"] == 2 and task["outputFormat"] == "PNG"


async def test_a_file_that_is_not_an_image_fails_alone(playground):
    await playground.connect(KEY)
    await playground.settings(steps=2)
    await playground.add_files(
        upload("one.png", picture(32, 32)),
        upload("notes.txt", b"these are not pixels\n", "text/plain"),
        upload("two.png", picture(24, 40, seed=3)),
    )
    cards = await playground.cards_by_name(3)
    assert await playground.wait_ended(cards["notes.txt"]) == "error"
    message = await playground.card(cards["notes.txt"]).get_by_test_id("task-error").text_content()
    assert "could not decode image" in message and "invalidInputImage" in message
    for name in ("one.png", "two.png"):
        assert await playground.wait_ended(cards[name]) == "done"
        assert await playground.card(cards[name]).get_by_test_id("result-image").count() == 1
    assert await playground.card(cards["notes.txt"]).get_by_test_id("result-image").count() == 0


async def test_a_card_shows_progress_before_its_result(playground):
    await playground.connect(KEY)
    await playground.settings(steps=12)
    # Record every change of the card's status and progress as the page makes it.
    await playground.page.evaluate(
        """() => {
        window.changes = [];
        new MutationObserver((records) => {
          for (const r of records) {
            const card = r.target.closest('[data-testid=task-card]');
            if (!card) continue;
            const bar = card.querySelector('[data-testid=task-progress]');
            window.changes.push([card.dataset.status, bar ? bar.value : null]);
          }
        }).observe(document.body, {subtree: true, childList: true, attributes: true,
                                    attributeFilter: ['data-status', 'value']});
        }"""
    )
    await playground.add_files(upload("slow.png", picture(64, 64)))
    task_uuid = (await playground.cards_by_name(1))["slow.png"]
    assert await playground.wait_ended(task_uuid) == "done"
    changes = await playground.page.evaluate("window.changes")
    statuses = [status for status, _ in changes]
    assert "running" in statuses and statuses.index("running") < statuses.index("done"), changes
    assert any(status == "running" and 0 < value < 100 for status, value in changes), changes
    kinds = [item.get("status") for item in playground.wire.items_for(task_uuid)]
    assert kinds.index("processing") < kinds.index("success")


async def test_a_dropped_socket_resumes_and_the_result_arrives_once(playground, server):
    await playground.connect(KEY)
    session = await playground.page.evaluate(
        "sessionStorage.getItem('latent-upscaler.connectionSessionUUID')"
    )
    await playground.settings(steps=60)
    await playground.add_files(upload("long.png", picture(64, 64)))
    task_uuid = (await playground.cards_by_name(1))["long.png"]

    def record():
        return server.gateway.sessions.lookup(KEY, task_uuid)

    await wait_for(lambda: record() is not None and record().progress > 0)
    async with httpx.AsyncClient() as http:
        stats = (await http.get(f"{playground.base_url}/stats")).json()
    assert stats["gateway"]["tasks_in_flight"] == 1 and stats["engine"]["denoising"] == 1
    # The page's network goes down (its reconnections fail), then the server loses the socket
    # mid-task, as with a network failure; the result finishes while nobody is connected.
    await playground.page.context.set_offline(True)
    [connection] = [c for c in server.connections if c.session and c.session.session_id == session]
    assert not record().finished
    connection.ws.transport.abort()
    await wait_for(lambda: record().finished, timeout=60)
    assert not record().session.attached and len(record().session.replay) >= 1  # kept for a resume
    await playground.page.context.set_offline(False)

    assert await playground.wait_ended(task_uuid) == "done"
    await playground.quiet(0.5)
    resume = playground.wire.sent_tasks("authentication")[-1]
    assert resume["connectionSessionUUID"] == session  # it resumed its session …
    successes = [i for i in playground.wire.items_for(task_uuid) if i.get("status") == "success"]
    assert len(successes) == 1  # … and got the result once …
    assert len(playground.wire.sent_tasks("upscale")) == 1  # … without sending the task again
    assert await playground.card(task_uuid).get_by_test_id("result-image").count() == 1
    assert await playground.result_size(task_uuid) == (128, 128)
    # While offline, the browser itself logs each failed connection attempt and each failed
    # load (the live panel polls /stats every 2 s): not the page's doing.
    errors = playground.wire.console_errors
    errors[:] = [e for e in errors if not _offline_noise(e)]


def _offline_noise(message: str) -> bool:
    return message.startswith("WebSocket connection to") or message.endswith("net::ERR_INTERNET_DISCONNECTED")


async def test_a_wrong_key_gets_a_clear_message_and_nothing_else_is_sent(playground):
    await playground.add_files(upload("before.png", picture(16, 16)))  # waits for a connection
    await playground.connect("not-the-key", expect="refused")
    message = await playground.hook("connection-message").text_content()
    assert "refused the API key" in message and "invalidApiKey" in message
    await playground.add_files(upload("after.png", picture(16, 16)))
    cards = await playground.cards_by_name(2)
    await playground.quiet(0.5)
    for task_uuid in cards.values():
        assert await playground.card(task_uuid).get_attribute("data-status") == "queued"
    assert [t["taskType"] for t in playground.wire.sent_tasks()] == ["authentication"]
    assert await playground.page.evaluate("sessionStorage.getItem('latent-upscaler.apiKey')") is None


async def test_the_key_goes_only_into_the_websocket(playground):
    await playground.connect(KEY)
    await playground.settings(steps=2)
    await playground.add_files(upload("k.png", picture(16, 16)))
    task_uuid = (await playground.cards_by_name(1))["k.png"]
    assert await playground.wait_ended(task_uuid) == "done"
    await playground.page.reload()  # the key is kept for the tab (sessionStorage) …
    assert await playground.hook("api-key").input_value() == KEY
    for url, headers in playground.wire.requests:  # … and never put in a URL or a header
        assert KEY not in url and KEY not in orjson.dumps(headers).decode()
    assert not any(KEY in text for text in playground.wire.console)
    assert [t["apiKey"] for t in playground.wire.sent_tasks("authentication")] == [KEY]


async def test_the_page_has_a_strict_csp_and_loads_without_errors(playground, server):
    response = await playground.page.goto(playground.base_url + "/playground")
    headers = response.headers
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["content-type"] == "text/html; charset=utf-8"
    # The module ran (it fills the panel from GET /stats) and nothing was blocked.
    await playground.page.wait_for_function(
        "document.getElementById('stat-server-tasks').textContent !== '—'"
    )
    assert await playground.page.get_by_test_id("connect").is_enabled()


@pytest.mark.parametrize("width,height", [(1280, 800), (390, 844)])
async def test_readable_at_desktop_and_phone_widths(browser, server, width, height):
    context = await browser.new_context(viewport={"width": width, "height": height})
    page = Playground(await context.new_page(), f"http://127.0.0.1:{server.port}")
    await page.open("/playground")
    await page.connect(KEY)  # the button says "Disconnect" now, its longest text
    overflow = await page.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    for hook in ("api-key", "connect", "file-input"):
        box = await page.hook(hook).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, (hook, box)
    await context.close()
    assert overflow <= 0
    assert not page.wire.console_errors, page.wire.console_errors


async def test_the_screenshot_script_shows_finished_results_and_live_figures(browser, server, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "playground_screenshot", ROOT / "docs" / "playground_screenshot.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "playground.png"
    base = f"http://127.0.0.1:{server.port}"
    panel = await script.shoot(browser, base, out, width=1280, height=800, steps=2, key=KEY)
    assert Image.open(out).size[0] == 1280
    assert panel["throughput"].endswith("tasks/s") and float(panel["throughput"].split()[0]) > 0
    assert float(panel["rows-per-call"].removeprefix("idle (mean ").rstrip(")")) >= 1


# Plain HTTP: no browser needed.


async def test_routes_serve_the_page_stats_and_a_redirect_but_upgrades_on_root_still_work(server):
    base = f"http://127.0.0.1:{server.port}"
    async with httpx.AsyncClient() as http:
        root = await http.get(base + "/")
        assert root.status_code == 302 and root.headers["location"] == "playground"
        assert (await http.get(base + "/playground/")).headers["location"] == "../playground"
        for path, media_type in [
            ("/playground", "text/html; charset=utf-8"),
            ("/playground/app.js", "text/javascript; charset=utf-8"),
            ("/playground/style.css", "text/css; charset=utf-8"),
            ("/playground/icon.svg", "image/svg+xml"),
        ]:
            response = await http.get(base + path)
            assert response.status_code == 200 and response.headers["content-type"] == media_type
            assert response.headers["x-content-type-options"] == "nosniff"
            assert "script-src 'self'" in response.headers["content-security-policy"]
        assert (await http.get(base + "/playground/nope.js")).status_code == 404
        assert (await http.get(base + "/playground/../routes.py")).status_code == 404
        stats = (await http.get(base + "/stats")).json()  # no key needed
    assert {"unet_calls", "unet_rows", "mean_rows", "succeeded", "failed"} <= set(stats["engine"])
    assert {"connections", "tasks_in_flight"} <= set(stats["gateway"])
    async with connect(f"ws://127.0.0.1:{server.port}/") as ws:  # WebSocket upgrades on / still work
        await ws.send('[{"taskType":"ping","ping":true}]')
        assert orjson.loads(await ws.recv()) == {"data": [{"taskType": "ping", "pong": True}]}


@pytest.mark.parametrize("ci,outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
async def test_a_missing_browser_skips_locally_and_fails_in_ci(monkeypatch, ci, outcome):
    import tests.browser

    monkeypatch.setattr(tests.browser, "chromium_path", lambda: None)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="apt-get install -y --no-install-recommends chromium"):
        tests.browser.require_chromium()
