"""Outbound HTTP: image URLs in, webhooks and uploads out, all behind an SSRF guard.

Every request goes through :class:`Outbound`, an ``httpx.AsyncClient`` with explicit
timeouts and limits and an injectable transport (tests pass a real local server, or
``httpx.MockTransport``). Redirects are followed by hand so that each hop is checked
again by :class:`AddressGuard`, which resolves the host and refuses private, loopback,
link-local, multicast, reserved and unspecified addresses unless the server was
started with ``--allow-private-networks``.

httpx errors become :class:`OutboundError` here and nowhere else.

Known limit: the guard checks the addresses a name resolves to, then httpx resolves
it again to connect; a DNS server that answers differently the second time (DNS
rebinding) could slip past. Pinning the checked address needs a custom transport.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

__all__ = ["AddressGuard", "Outbound", "OutboundError", "RetryPolicy"]

logger = logging.getLogger(__name__)


class OutboundError(Exception):
    """An outbound request that failed or was refused. ``reason`` is one of
    ``blocked``, ``invalid``, ``timeout``, ``too_large``, ``status``, ``network``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class AddressGuard:
    """Refuses URLs whose host resolves to a non-public address (SSRF)."""

    def __init__(self, allow_private: bool = False) -> None:
        self.allow_private = allow_private

    async def check(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OutboundError("invalid", f"not an http(s) URL: {url[:200]!r}")
        if self.allow_private:
            return
        host = parts.hostname
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise OutboundError("network", f"cannot resolve host {host!r}") from exc
        for info in infos:
            address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
            if not _is_public(address):
                raise OutboundError(
                    "blocked",
                    f"host {host!r} resolves to {address}, a private or local address; "
                    "the server refuses those unless started with --allow-private-networks",
                )


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_unspecified)


@dataclass(frozen=True)
class RetryPolicy:
    """Webhook and upload retries: ``tries`` attempts, waiting ``first_delay`` doubling
    up to ``max_delay`` between them (PROTOCOL.md: 250 ms doubling to 8 s, 5 tries)."""

    tries: int = 5
    first_delay: float = 0.25
    max_delay: float = 8.0

    def delays(self) -> list[float]:
        return [min(self.first_delay * 2**i, self.max_delay) for i in range(self.tries - 1)]


class Outbound:
    def __init__(
        self,
        *,
        allow_private: bool = False,
        timeout: float = 10.0,
        max_redirects: int = 3,
        retry: RetryPolicy = RetryPolicy(),
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.guard = AddressGuard(allow_private)
        self.timeout = timeout
        self.max_redirects = max_redirects
        self.retry = retry
        self._sleep = sleep
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
            follow_redirects=False,
            headers={"User-Agent": "latent-upscale-gateway"},
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str, *, max_bytes: int) -> tuple[bytes, str | None]:
        """GET ``url`` (following up to ``max_redirects`` checked hops) and return the
        body and its Content-Type; refuses bodies over ``max_bytes`` and requests
        that take longer than the timeout in total."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self._fetch(url, max_bytes)
        except TimeoutError as exc:
            raise OutboundError(
                "timeout", f"fetching {url[:200]} took longer than {self.timeout:g} s"
            ) from exc

    async def _fetch(self, url: str, max_bytes: int) -> tuple[bytes, str | None]:
        for _ in range(self.max_redirects + 1):
            await self.guard.check(url)
            try:
                async with self._client.stream("GET", url) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise OutboundError("status", f"GET {url[:200]} answered HTTP {response.status_code}")
                    declared = int(response.headers.get("content-length") or 0)
                    if declared > max_bytes:
                        raise OutboundError("too_large", f"{url[:200]} is {declared} bytes, over {max_bytes}")
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            raise OutboundError("too_large", f"{url[:200]} is over {max_bytes} bytes")
                    return bytes(body), response.headers.get("content-type")
            except httpx.HTTPError as exc:
                raise OutboundError("network", f"GET {url[:200]} failed: {type(exc).__name__}") from exc
        raise OutboundError("invalid", f"more than {self.max_redirects} redirects")

    async def post_json(self, url: str, body: bytes) -> None:
        """POST a JSON body (already encoded), retrying per :class:`RetryPolicy`."""
        await self._send("POST", url, body, "application/json")

    async def put_bytes(self, url: str, body: bytes, content_type: str) -> None:
        """PUT raw bytes, retrying per :class:`RetryPolicy`."""
        await self._send("PUT", url, body, content_type)

    async def _send(self, method: str, url: str, body: bytes, content_type: str) -> None:
        delays = [*self.retry.delays(), None]
        last: OutboundError | None = None
        for delay in delays:
            try:
                await self.guard.check(url)
                response = await self._client.request(
                    method, url, content=body, headers={"Content-Type": content_type}
                )
                if 200 <= response.status_code < 300:
                    return
                last = OutboundError("status", f"{method} {url[:200]} answered HTTP {response.status_code}")
            except OutboundError as exc:
                if exc.reason in ("blocked", "invalid"):
                    raise
                last = exc
            except httpx.HTTPError as exc:
                last = OutboundError("network", f"{method} {url[:200]} failed: {type(exc).__name__}")
            if delay is not None:
                logger.info("%s; retrying in %.2f s", last, delay)
                await self._sleep(delay)
        assert last is not None
        raise last
