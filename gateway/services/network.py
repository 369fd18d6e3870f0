"""The sessions network and its firewall, made ready once per gateway process.

Session containers get an internal Docker bridge (no inter-container traffic, no route out
through Docker's NAT) and, on the host, the firewall of runtime/firewall.py limiting them to the
gateway (model proxy and API) and their Redis. ``CCGATE_SESSIONS_FIREWALL``: ``on`` refuses to
start a session without the firewall (503 naming it), ``auto`` (default) applies it when it can
(root and iptables) and otherwise logs a warning once, ``off`` never touches iptables.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from urllib.parse import urlsplit

from gateway.config import Settings
from gateway.errors import DependencyUnavailable
from gateway.services.runtime import ContainerRuntime
from gateway.services.runtime.firewall import Allowed, FirewallError, SessionsFirewall, bridge_name

logger = logging.getLogger(__name__)

HOST_ALIAS = "host.docker.internal"


def open_network(settings: Settings) -> str:
    """The network of ``open`` egress sessions: not internal, same firewall otherwise."""
    return f"{settings.docker_network}-open"


class SessionsNetwork:
    """Ensures the network and the firewall before the first session container starts."""

    def __init__(self, settings: Settings, runtime: ContainerRuntime) -> None:
        self._settings = settings
        self._runtime = runtime
        self._firewall = SessionsFirewall(settings.docker_network)
        self._open_firewall = SessionsFirewall(open_network(settings), open_egress=True)
        self._lock = asyncio.Lock()
        self._ready = False
        self.firewall_active = False
        """True once the firewall rules are in place (for /metrics and the log)."""
        self.host_gateway = "0.0.0.0"
        """The host's address on Docker's default bridge (where ``host-gateway`` points):
        the egress proxies listen there."""

    async def ensure(self) -> None:
        """Make the network (and firewall) ready; a no-op once done. Raises
        DependencyUnavailable (docker, or firewall when it is required and failed)."""
        if self._ready:
            return
        async with self._lock:
            if self._ready:
                return
            s = self._settings
            host_addresses = await self._runtime.ensure_network(
                s.docker_network,
                internal=s.sessions_network_internal,
                bridge=bridge_name(s.docker_network),
            )
            if host_addresses:
                self.host_gateway = host_addresses[-1]
            await self._runtime.ensure_network(
                open_network(s), internal=False, bridge=bridge_name(open_network(s))
            )
            await self._apply_firewall(host_addresses)
            self._ready = True

    async def _apply_firewall(self, host_addresses: list[str]) -> None:
        mode = self._settings.sessions_firewall
        if mode == "off":
            return
        try:
            allowed = await self._allowed(host_addresses)
            await self._firewall.apply(allowed)
            await self._open_firewall.apply(allowed)
            self.firewall_active = True
        except (FirewallError, OSError) as exc:
            if mode == "on":
                raise DependencyUnavailable("firewall", str(exc)) from exc
            logger.warning(
                "sessions firewall not applied (CCGATE_SESSIONS_FIREWALL=auto): %s; session "
                "containers can reach every port of this host",
                exc,
            )

    async def _allowed(self, host_addresses: list[str]) -> list[Allowed]:
        """Where containers are told to connect: the gateway and Redis (and their ports)."""
        s = self._settings
        targets = [
            urlsplit(s.gateway_url_for_containers()),
            urlsplit(s.container_redis_url(None, None)),
        ]
        allowed: list[Allowed] = []
        for url in targets:
            host = url.hostname or ""
            port = url.port or (443 if url.scheme == "https" else 80)
            if url.scheme.startswith("redis"):
                port = url.port or 6379
            for address in await self._addresses(host, host_addresses):
                allowed.append(Allowed(address, port))
        low, high = s.egress_port_range
        egress_host = urlsplit(f"http://{s.egress_host}").hostname or ""
        for address in await self._addresses(egress_host, host_addresses):
            allowed.append(Allowed(address, f"{low}:{high}"))
        return allowed

    @staticmethod
    async def _addresses(host: str, host_addresses: list[str]) -> list[str]:
        if host == HOST_ALIAS:
            return host_addresses
        try:
            ipaddress.IPv4Address(host)
            return [host]
        except ValueError:
            pass
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, None, family=socket.AF_INET, type=socket.SOCK_STREAM
        )
        return sorted({str(info[4][0]) for info in infos})
