"""Outbound HTTP: image URLs in, webhooks and uploads out, all behind an SSRF guard.

Every request goes through :class:`Outbound`, an ``httpx.AsyncClient`` with explicit
timeouts and limits and an injectable transport (tests pass ``httpx.MockTransport``).
Redirects are followed by hand so that each hop is checked again by
:class:`AddressGuard`, which resolves the host and refuses private, loopback,
link-local, multicast, reserved and unspecified addresses unless the server was
started with ``--allow-private-networks``.

The default transport connects through :class:`_PinnedBackend`: each new connection
resolves its host through the guard and connects to an address the guard has just
checked, so a DNS server that answers differently the second time (DNS rebinding)
cannot steer a request to a private address. TLS still verifies the host name.

httpx errors become :class:`OutboundError` here and nowhere else. Each request's end
(after its retries) is reported to :attr:`Outbound.observe`, when set, as
``(kind, outcome)``: kind ``input`` (:meth:`~Outbound.fetch`), ``webhook``
(:meth:`~Outbound.post_json`) or ``upload`` (:meth:`~Outbound.put_bytes`); outcome
``success`` or the :class:`OutboundError` reason (the metrics count them).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

__all__ = ["AddressGuard", "Outbound", "OutboundError", "RetryPolicy"]

logger = logging.getLogger(__name__)


class OutboundError(Exception):
    """An outbound request that failed or was refused. ``reason`` is one of
    ``blocked``, ``invalid``, ``timeout``, ``too_large``, ``status``, ``network``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def _system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


class AddressGuard:
    """Refuses URLs whose host resolves to a non-public address (SSRF). ``resolve``
    (host, port → addresses) is the system resolver unless a test passes another."""

    def __init__(
        self, allow_private: bool = False, resolve: Resolver = _system_resolve, resolve_timeout: float = 5.0
    ) -> None:
        self.allow_private = allow_private
        self._resolve = resolve
        self.resolve_timeout = resolve_timeout

    async def check(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OutboundError("invalid", f"not an http(s) URL: {url[:200]!r}")
        if not self.allow_private:
            await self.addresses(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))

    async def addresses(self, host: str, port: int) -> list[str]:
        """The addresses ``host`` resolves to, all checked; raises if any is refused."""
        try:
            async with asyncio.timeout(self.resolve_timeout):
                found = await self._resolve(host, port)
        except (socket.gaierror, UnicodeError) as exc:
            raise OutboundError("network", f"cannot resolve host {host!r}") from exc
        except TimeoutError as exc:
            raise OutboundError(
                "timeout", f"resolving {host!r} took over {self.resolve_timeout:g} s"
            ) from exc
        if not found:
            raise OutboundError("network", f"cannot resolve host {host!r}")
        for text in found:
            address = ipaddress.ip_address(text.split("%", 1)[0])
            if not self.allow_private and not _is_public(address):
                raise OutboundError(
                    "blocked",
                    f"host {host!r} resolves to {address}, a private or local address; "
                    "the server refuses those unless started with --allow-private-networks",
                )
        return found


_PER_ADDRESS_TIMEOUT = 3.0  # seconds to connect to one of several addresses of a host


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, but every TCP connection goes to an address that
    :class:`AddressGuard` resolved and checked at that moment."""

    def __init__(self, guard: AddressGuard) -> None:
        self._guard = guard
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        last: Exception | None = None
        addresses = await self._guard.addresses(host, port)
        for i, address in enumerate(addresses):
            # In the resolver's order (RFC 6724); one dead route must not use up the
            # whole timeout while another address would answer.
            limit = (
                timeout if i == len(addresses) - 1 or timeout is None else min(timeout, _PER_ADDRESS_TIMEOUT)
            )
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=limit, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise OutboundError("invalid", "outbound requests do not use Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _pinned_transport(guard: AddressGuard, limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
    # httpx has no argument for the network backend: give its transport a pool that
    # uses ours, with the same settings (``_pool`` has been its pool since httpx 0.18).
    if not isinstance(getattr(transport, "_pool", None), httpcore.AsyncConnectionPool):
        raise RuntimeError(
            f"this httpx ({httpx.__version__}) has no connection pool to pin; use httpx 0.27/0.28"
        )
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=_PinnedBackend(guard),
    )
    return transport


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
        guard: AddressGuard | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.guard = guard or AddressGuard(allow_private)
        self.timeout = timeout
        self.max_redirects = max_redirects
        self.retry = retry
        self._sleep = sleep
        #: Called with (kind, outcome) as each request ends; see the module docstring.
        self.observe: Callable[[str, str], None] | None = None
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        self._client = httpx.AsyncClient(
            transport=transport or _pinned_transport(self.guard, limits),
            timeout=httpx.Timeout(timeout),
            limits=limits,
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
                found = await self._fetch(url, max_bytes)
        except TimeoutError as exc:
            self._observe("input", "timeout")
            raise OutboundError(
                "timeout", f"fetching {url[:200]} took longer than {self.timeout:g} s"
            ) from exc
        except OutboundError as exc:
            self._observe("input", exc.reason)
            raise
        self._observe("input", "success")
        return found

    def _observe(self, kind: str, outcome: str) -> None:
        if self.observe is not None:
            self.observe(kind, outcome)

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
        """POST a JSON body (already encoded: a webhook), retrying per :class:`RetryPolicy`."""
        await self._observed("webhook", self._send("POST", url, body, "application/json"))

    async def put_bytes(self, url: str, body: bytes, content_type: str) -> None:
        """PUT raw bytes (an upload), retrying per :class:`RetryPolicy`."""
        await self._observed("upload", self._send("PUT", url, body, content_type))

    async def _observed(self, kind: str, sending: Awaitable[None]) -> None:
        try:
            await sending
        except OutboundError as exc:
            self._observe(kind, exc.reason)
            raise
        self._observe(kind, "success")

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
