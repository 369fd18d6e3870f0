"""Callbacks: POST a child's results to the URL given at spawn time (retried, best effort).

A callback URL comes from an agent (the spawn tool) or a client, so it is an SSRF vector: it
is refused (422 at spawn) when its host is or resolves to a loopback, private, link-local,
multicast, reserved or unspecified address, unless the address is inside a network the operator
allows (``CCGATE_CALLBACK_ALLOWED_NETWORKS``, CIDRs). The check is repeated before every POST
(DNS may have changed); for ``http`` the POST goes to the address that passed the check (the
Host header keeps the name), so a rebinding resolver cannot redirect it. For ``https`` the
connection resolves again (certificate checks need the name): a narrow rebinding window remains.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from gateway.errors import CallbackRefused
from wrapper.protocol import EventType

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Sequence[str]) -> list[Network]:
    """CIDRs from settings; raises ValueError naming a bad one."""
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]


def refusal(address: IPAddress, allowed: Sequence[Network]) -> str | None:
    """Why ``address`` may not be called (None when it may): its class, unless allowed."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in net for net in allowed):
        return None
    for kind, flagged in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    ):
        if flagged:
            return kind
    return None


async def resolve_callback(url: str, allowed: Sequence[Network]) -> IPAddress:
    """The address to call for ``url``: every address its host resolves to must be allowed.

    Raises CallbackRefused (422) naming the host, the address and its class, or saying the
    host does not resolve.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise CallbackRefused(f"callback host {host!r} does not resolve: {exc}") from exc
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    for address in addresses:
        why = refusal(address, allowed)
        if why is not None:
            raise CallbackRefused(
                f"callback host {host!r} resolves to {address}, a {why} address; ccgate does "
                "not call those (an operator can allow networks: CCGATE_CALLBACK_ALLOWED_NETWORKS)"
            )
    return addresses[0]


def _pinned(url: str, address: IPAddress) -> tuple[str, dict[str, str]]:
    """For http: the URL with the checked address as host, and the Host header to send."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        return url, {}
    host = f"[{address}]" if isinstance(address, ipaddress.IPv6Address) else str(address)
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc)), {"Host": parts.netloc}


async def post_callback(
    url: str, event: EventType, payload: dict[str, Any], *, allowed: Sequence[Network] = ()
) -> None:
    """POST ``{"event": <child_* type>, **payload}`` as JSON; 3 tries, then log and drop.
    A URL that no longer passes the address check is dropped with a warning."""
    body = {"event": event.value, **payload}
    try:
        address = await resolve_callback(url, allowed)
    except CallbackRefused as exc:
        logger.warning("callback dropped: %s", exc.message)
        return
    target, headers = _pinned(url, address)
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(httpx.HTTPError),
            stop=stop_after_attempt(3),
            wait=wait_exponential(multiplier=0.5, max=5),
            reraise=True,
        ):
            with attempt:
                async with httpx.AsyncClient(timeout=10, follow_redirects=False) as client:
                    response = await client.post(target, json=body, headers=headers)
                    response.raise_for_status()
    except httpx.HTTPError as exc:
        logger.warning("callback to %s failed: %s", url, exc)
