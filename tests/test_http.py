"""Outbound HTTP against real local servers, and the SSRF guard."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import httpx
import pytest

from gateway.http import AddressGuard, Outbound, OutboundError, RetryPolicy


class Recorder(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, str, str, bytes]]] = []
    fail_first: int = 0
    body = b"x" * 1000

    def log_message(self, *args):  # keep test output quiet
        pass

    def _record(self):
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length)
        type(self).received.append((self.command, self.path, self.headers.get("Content-Type"), data))
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(500)
            self.end_headers()
            return
        self.send_response(200)
        self.end_headers()

    do_POST = _record
    do_PUT = _record

    def do_GET(self):
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/image")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


@pytest.fixture
def server():
    Recorder.received = []
    Recorder.fail_first = 0
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


async def no_sleep(_: float) -> None:
    return None


async def test_loopback_is_refused_by_default(server):
    out = Outbound()
    with pytest.raises(OutboundError) as err:
        await out.fetch(server + "/image", max_bytes=10_000)
    assert err.value.reason == "blocked" and "--allow-private-networks" in str(err.value)
    await out.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3/x",
        "http://192.168.0.1/",
        "http://169.254.169.254/latest",
        "http://[::1]/",
        "http://0.0.0.0/",
    ],
)
async def test_private_addresses_are_refused(url):
    with pytest.raises(OutboundError) as err:
        await AddressGuard().check(url)
    assert err.value.reason == "blocked"


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "not a url"])
async def test_non_http_urls_are_invalid(url):
    with pytest.raises(OutboundError) as err:
        await AddressGuard(allow_private=True).check(url)
    assert err.value.reason == "invalid"


async def test_each_redirect_hop_is_checked():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "93.184.216.34":
            return httpx.Response(302, headers={"Location": "http://10.0.0.7/secret"})
        return httpx.Response(200, content=b"secret")

    out = Outbound(transport=httpx.MockTransport(handler))
    with pytest.raises(OutboundError) as err:
        await out.fetch("http://93.184.216.34/image.png", max_bytes=1000)
    assert err.value.reason == "blocked" and "10.0.0.7" in str(err.value)
    await out.aclose()


async def test_allowed_private_fetch_follows_redirects_and_limits_size(server):
    out = Outbound(allow_private=True)
    body, content_type = await out.fetch(server + "/redirect", max_bytes=10_000)
    assert body == Recorder.body and content_type == "image/png"
    with pytest.raises(OutboundError) as err:
        await out.fetch(server + "/image", max_bytes=100)
    assert err.value.reason == "too_large"
    await out.aclose()


async def test_webhook_is_retried_after_a_500(server):
    Recorder.fail_first = 1
    out = Outbound(allow_private=True, sleep=no_sleep)
    await out.post_json(server + "/hook", b'{"taskUUID":"t"}')
    assert [r[0] for r in Recorder.received] == ["POST", "POST"]
    assert Recorder.received[-1][2] == "application/json" and Recorder.received[-1][3] == b'{"taskUUID":"t"}'
    await out.aclose()


async def test_upload_gives_up_after_its_tries(server):
    Recorder.fail_first = 10
    slept: list[float] = []

    async def record_sleep(d: float) -> None:
        slept.append(d)

    out = Outbound(allow_private=True, sleep=record_sleep, retry=RetryPolicy(tries=5))
    with pytest.raises(OutboundError) as err:
        await out.put_bytes(server + "/up", b"\x89PNG", "image/png")
    assert err.value.reason == "status"
    assert len(Recorder.received) == 5 and Recorder.received[0][2] == "image/png"
    assert slept == [0.25, 0.5, 1.0, 2.0]
    await out.aclose()


def scripted_resolver(*answers: list[str]):
    """A resolver that gives each answer in turn (the last one from then on)."""
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return answers[min(len(calls), len(answers)) - 1]

    resolve.calls = calls
    return resolve


async def test_connections_go_to_the_address_the_guard_resolved(server):
    """The name does not exist for the system resolver: only a connection made to the
    guard's own answer can reach the server."""
    port = server.rsplit(":", 1)[1]
    resolve = scripted_resolver(["127.0.0.1"])
    out = Outbound(guard=AddressGuard(allow_private=True, resolve=resolve))
    data, content_type = await out.fetch(f"http://pinned.invalid:{port}/image", max_bytes=10_000)
    assert data == Recorder.body and content_type == "image/png"
    assert resolve.calls == ["pinned.invalid"]
    await out.aclose()


async def test_dns_rebinding_between_check_and_connect_is_refused(server):
    """The first answer (checked before the request) is public; the one given when the
    connection is made is loopback: the connection is refused, the server never hit."""
    port = server.rsplit(":", 1)[1]
    resolve = scripted_resolver(["93.184.216.34"], ["127.0.0.1"])
    out = Outbound(guard=AddressGuard(resolve=resolve))
    with pytest.raises(OutboundError) as err:
        await out.fetch(f"http://rebind.invalid:{port}/image", max_bytes=10_000)
    assert err.value.reason == "blocked" and "127.0.0.1" in str(err.value)
    assert len(resolve.calls) == 2
    await out.aclose()
    resolve = scripted_resolver(["93.184.216.34"], ["127.0.0.1"])
    out = Outbound(guard=AddressGuard(resolve=resolve), sleep=no_sleep)
    with pytest.raises(OutboundError) as err:
        await out.post_json(f"http://rebind.invalid:{port}/hook", b"{}")
    assert err.value.reason == "blocked" and len(resolve.calls) == 2
    assert Recorder.received == []  # the webhook never reached the loopback server
    await out.aclose()


async def test_a_host_with_several_addresses_falls_back_to_one_that_answers(server):
    port = server.rsplit(":", 1)[1]
    resolve = scripted_resolver(["::1", "127.0.0.1"])  # nothing listens on [::1]:port
    out = Outbound(guard=AddressGuard(allow_private=True, resolve=resolve))
    data, _ = await out.fetch(f"http://two.invalid:{port}/image", max_bytes=10_000)
    assert data == Recorder.body
    await out.aclose()
