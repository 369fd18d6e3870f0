"""The sessions firewall: what a session container may reach, as host iptables rules.

Session containers sit on an internal Docker bridge (no route out through Docker's NAT, no
inter-container traffic) whose interface has a fixed name (``bridge_name``). Docker still lets
such a container reach every port of the host itself and every port the host publishes, so the
gateway adds one chain, ``CCGATE-<hash>``, jumped to from ``INPUT`` (traffic to the host) and
from ``DOCKER-USER`` (traffic Docker forwards, e.g. to a published Redis port) for packets
coming in on that bridge:

    -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
    -p tcp -m conntrack --ctorigdst <host address> --ctorigdstport <port> -j ACCEPT   (each)
    -j REJECT

where (host address, port) are what containers are told to use: the gateway (model proxy and
API), Redis and, when configured, the egress proxy. ``--ctorigdst`` matches the destination
before Docker's DNAT, so a published port is allowed by the port the container dialled. Replies
to the containers are accepted in ``DOCKER-USER`` (``-o <bridge>``, established only).

Rules are only ever added (checked with ``iptables -C`` first), never flushed: several gateways
on one host (replicas, tests) each add their own ports. Everything is IPv4 (the sessions
network has no IPv6). Errors raise FirewallError with iptables' own message.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


class FirewallError(Exception):
    """iptables is missing or refused a rule (the message says which)."""


def bridge_name(network: str) -> str:
    """Linux interface name of the sessions bridge (≤ 15 characters, stable per network)."""
    return "ccg-" + hashlib.sha256(network.encode()).hexdigest()[:10]


def chain_name(network: str) -> str:
    """The firewall chain of a sessions network."""
    return "CCGATE-" + hashlib.sha256(network.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Allowed:
    """One destination session containers may open TCP connections to."""

    address: str
    port: int | str
    """A port, or a range ``"low:high"``."""


PRIVATE_NETWORKS = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/3",
)
"""Destinations an ``open`` session may not reach (its traffic to the internet is forwarded)."""


def chain_rules(allowed: Iterable[Allowed], *, open_egress: bool = False) -> list[list[str]]:
    """The chain's rules in order (iptables arguments after ``-A <chain>``).

    Closed (the internal network): established, the allowed destinations, then REJECT.
    Open: established, the allowed destinations, REJECT for the host itself and for private,
    loopback, link-local and multicast destinations (matched before DNAT), then nothing: the
    rest returns to Docker's own forwarding, i.e. the internet."""
    rules = [["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"]]
    for a in sorted(set(allowed), key=lambda x: (x.address, str(x.port))):
        rules.append(
            [
                "-p", "tcp", "-m", "conntrack",
                "--ctorigdst", a.address, "--ctorigdstport", str(a.port),
                "-j", "ACCEPT",
            ]
        )  # fmt: skip
    if not open_egress:
        rules.append(["-j", "REJECT"])
        return rules
    rules.append(["-m", "addrtype", "--dst-type", "LOCAL", "-j", "REJECT"])
    for cidr in PRIVATE_NETWORKS:
        rules.append(["-m", "conntrack", "--ctorigdst", cidr, "-j", "REJECT"])
    return rules


class SessionsFirewall:
    """Adds the rules above for one sessions network (see the module docstring)."""

    def __init__(
        self, network: str, iptables: str | None = None, *, open_egress: bool = False
    ) -> None:
        self.network = network
        self.open_egress = open_egress
        self.bridge = bridge_name(network)
        self.chain = chain_name(network)
        self._iptables = iptables or shutil.which("iptables")

    @property
    def available(self) -> bool:
        """True when an iptables binary is on PATH."""
        return self._iptables is not None

    async def apply(self, allowed: Iterable[Allowed]) -> None:
        """Make sure the chain, its jumps and an ACCEPT for each of ``allowed`` exist, in an
        order where the final REJECT stays last. Raises FirewallError."""
        if self._iptables is None:
            raise FirewallError("iptables is not installed (scripts/setup.sh installs it)")
        await self._ok("-N", self.chain)  # fails, harmlessly, when the chain exists
        wanted = chain_rules(allowed, open_egress=self.open_egress)
        accepts = [r for r in wanted if r[-1] == "ACCEPT"]
        tail = [r for r in wanted if r[-1] != "ACCEPT"]
        for rule in accepts:
            if not await self._ok("-C", self.chain, *rule):
                # Insert above the trailing REJECTs (position 1 keeps order irrelevant: every
                # ACCEPT is independent of the others).
                await self._run("-I", self.chain, "1", *rule)
        for rule in tail:
            if not await self._ok("-C", self.chain, *rule):
                await self._run("-A", self.chain, *rule)
        jumps = [
            ("INPUT", ["-i", self.bridge, "-j", self.chain]),
            ("DOCKER-USER", ["-i", self.bridge, "-j", self.chain]),
            (
                "DOCKER-USER",
                ["-o", self.bridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED",
                 "-j", "ACCEPT"],
            ),
        ]  # fmt: skip
        for table_chain, rule in jumps:
            if not await self._ok("-C", table_chain, *rule):
                await self._run("-I", table_chain, "1", *rule)
        logger.info(
            "sessions firewall: %s on %s allows %s",
            self.chain,
            self.bridge,
            ", ".join(f"{a.address}:{a.port}" for a in allowed) or "nothing",
        )

    async def _ok(self, *args: str) -> bool:
        code, _ = await self._exec(*args)
        return code == 0

    async def _run(self, *args: str) -> None:
        code, err = await self._exec(*args)
        if code != 0:
            raise FirewallError(f"iptables {' '.join(args)}: {err.strip() or f'exit {code}'}")

    async def _exec(self, *args: str) -> tuple[int, str]:
        assert self._iptables is not None
        proc = await asyncio.create_subprocess_exec(
            self._iptables,
            "-w",
            "5",
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout=15)
        except TimeoutError:
            proc.kill()
            raise FirewallError(f"iptables {' '.join(args)} did not finish in 15 s") from None
        return proc.returncode or 0, err.decode(errors="replace")
