"""Which addresses the operator's own pod may connect to when it inspects a model source (docs/security.md#egress).

A LlamaModel names any URL, and every redirect may lead elsewhere; the operator fetches the first bytes of it from
its own pod, which reaches its loopback, the node's link-local metadata service and every cluster address. With
the guard on (`Settings.source_egress_guard`, the default), the HTTP client of `sources` refuses:
- loopback, link-local, unspecified and multicast addresses and the cloud metadata services outside link-local
  (`METADATA_ADDRESSES`), always;
- the ranges of `Settings.source_blocked_cidrs` (the cluster's pod and Service ranges, typically).

The check runs where the connection is made: the host name is resolved once, every address it resolves to is
checked (one refused address refuses the host), and the connection goes to a checked address, not to a second
lookup, so a DNS answer that changes between check and connect (DNS rebinding) changes nothing. Every redirect
hop is a new request and is checked the same way. Through an HTTP(S) proxy (HTTPS_PROXY) the operator connects
only to the proxy: the target's name is then checked by a request hook before sending, by a lookup of its own
(the proxy resolves it again; enforce egress at the proxy too).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import Any

import httpcore
import httpx

from .config import Settings
from .errors import SourceAddressRefused

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_KEEPALIVE = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200"))
"""Cloud metadata services outside the link-local range (AWS over IPv6, Alibaba Cloud): never a model source."""


def refusal(address: Address, blocked: Sequence[Network] = ()) -> str | None:
    """Why the operator does not connect to `address`, or None when it may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address in METADATA_ADDRESSES:
        return "a cloud metadata service"
    for network in blocked:
        if address.version == network.version and address in network:
            return f"in {network}, a blocked range"
    return None


def _refused(host: str, address: Address, why: str) -> SourceAddressRefused:
    named = host if host == str(address) else f"{host} resolves to {address}"
    return SourceAddressRefused(
        f"{named} ({why}): the operator does not fetch model sources from loopback, link-local or blocked "
        "cluster addresses (docs/security.md#egress)")


async def checked_addresses(host: str, port: int, blocked: Sequence[Network], *, lookup_timeout: float | None = None
                            ) -> list[str]:
    """Every address `host` resolves to, once each, all of them allowed; raises `SourceAddressRefused`, or
    `TimeoutError` / `OSError` when the name cannot be looked up (transient: a Service not created yet)."""
    bare = host.strip("[]")
    try:
        addresses: list[Address] = [ipaddress.ip_address(bare)]
    except ValueError:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(bare, port, type=socket.SOCK_STREAM), lookup_timeout)
        addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos))
    for address in addresses:
        why = refusal(address, blocked)
        if why is not None:
            raise _refused(bare, address, why)
    return [str(address) for address in addresses]


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to checked addresses (see the module docstring)."""

    def __init__(self, blocked: Sequence[Network]) -> None:
        self.blocked = tuple(blocked)
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109 - httpcore's
                          local_address: str | None = None, socket_options: Iterable[Any] | None = None
                          ) -> httpcore.AsyncNetworkStream:
        failure: httpcore.ConnectError | None = None
        try:
            addresses = await checked_addresses(host, port, self.blocked, lookup_timeout=timeout)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"{host}: name lookup timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError(f"{host}: {exc.strerror or exc}") from exc
        for address in addresses:
            try:
                return await self.inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                    socket_options=socket_options)
            except httpcore.ConnectError as exc:
                failure = exc
        assert failure is not None  # checked_addresses returns at least one address or raises
        raise failure

    async def connect_unix_socket(self, path: str, timeout: float | None = None,  # noqa: ASYNC109 - httpcore's
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise SourceAddressRefused("unix sockets are not model sources")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def guarded_transport(blocked: Sequence[Network]) -> httpx.AsyncHTTPTransport:
    """httpx's transport with the guarded backend under its connection pool.

    httpx does not take a network backend, so the pool it builds is replaced by an identical one that has it
    (pinned by tests/unit/test_egress.py: a loopback URL must be refused at connect time).
    """
    transport = httpx.AsyncHTTPTransport()
    transport._pool = httpcore.AsyncConnectionPool(  # noqa: SLF001 - see the docstring
        ssl_context=httpx.create_ssl_context(),
        max_connections=_KEEPALIVE.max_connections,
        max_keepalive_connections=_KEEPALIVE.max_keepalive_connections,
        keepalive_expiry=_KEEPALIVE.keepalive_expiry,
        network_backend=GuardedBackend(blocked),
    )
    return transport


def source_client(settings: Settings, timeout: httpx.Timeout) -> httpx.AsyncClient:
    """The HTTP client `sources` inspects model sources with: guarded unless the settings turn the guard off."""
    if not settings.source_egress_guard:
        return httpx.AsyncClient(timeout=timeout)
    blocked = settings.source_blocked_cidrs

    async def check(request: httpx.Request) -> None:  # also covers requests sent through a proxy
        url = request.url
        try:
            await checked_addresses(url.host, url.port or (443 if url.scheme == "https" else 80), blocked,
                                    lookup_timeout=timeout.connect)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"{url.host}: name lookup timed out", request=request) from exc
        except OSError as exc:
            raise httpx.ConnectError(f"{url.host}: {exc.strerror or exc}", request=request) from exc

    return httpx.AsyncClient(timeout=timeout, transport=guarded_transport(blocked), event_hooks={"request": [check]})
