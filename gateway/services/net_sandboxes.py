"""Network sandboxes: network namespaces made ahead of time, joined by session containers.

Docker sets a container's network up when it starts it. On this project's machine the sessions
network (a user-defined bridge: veth pair, address, the embedded DNS's rules) is 100-170 ms of
a ~300 ms start, the largest part of a cold start that is not the CLI's own. A network sandbox
is a tiny container (``sleep``, no capabilities, 16 MiB, 4 pids) started ahead of time on the
network, with the sessions' extra hosts; a session container then starts with
``network_mode=container:<sandbox>`` and skips all of that: Kubernetes' pod sandbox (the
"pause" container), for the same reason. The container sees the same network, addresses,
DNS and /etc/hosts as one connected to the network itself, and the firewall (per bridge)
applies to it the same way.

Ready sandboxes are listed in Redis (``netns_free_key``): a claim is one LPOP, atomic across
replicas. Each replica refills towards ``CCGATE_NETWORK_SANDBOXES`` per network in use (the
default sessions network from the start, the open one after its first claim); concurrent
refills may overshoot by a few, claims drain them. A session container carries its sandbox's
id (label ``ccgate.netns``) and the runtime removes the sandbox with the container.

Nothing depends on a sandbox: an empty list, Redis down, or a sandbox that died (the
container's create fails; the sandbox is removed) and the container sets up its own network as
before. Docker down or slow: the refill fails, is logged and retried with a backoff; claims
only touch Redis. Leaks are swept (the reaper calls :meth:`sweep` under its lease): a sandbox
seen neither listed ready nor joined by a container for 30 s (longer than a claim takes to
become a created container) is removed, and list entries whose sandbox is gone or stopped are
dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.config import Settings
from gateway.errors import ContainerStartFailed, DependencyUnavailable
from gateway.metrics import Metrics
from gateway.services.network import open_network
from gateway.services.runtime import ContainerRuntime
from gateway.services.runtime.base import (
    LABEL_HELPER,
    LABEL_NETNS,
    LABEL_NETWORK,
    ContainerSpec,
    ContainerState,
)
from wrapper.protocol import netns_free_key

logger = logging.getLogger(__name__)

HELPER = "netns"
"""The ``ccgate.helper`` label of a network sandbox (the reaper and the death watch leave
helpers alone)."""
_IDLE_S = 5.0
_REFILL_DELAY_S = 2.0
_MAX_BACKOFF_S = 30.0


class NetworkSandboxes:
    """The ready network sandboxes of one deployment, and their refill and sweep.

    ``ensure_network`` makes the sessions networks (and their firewall) exist before the
    first sandbox is started on them. ``leak_grace_s``: how long a sandbox may be neither
    ready nor joined (a claim whose container is being created) before a sweep removes it.
    """

    def __init__(
        self,
        settings: Settings,
        runtime: ContainerRuntime,
        redis: aioredis.Redis,
        metrics: Metrics,
        ensure_network: Callable[[], Awaitable[None]],
        *,
        leak_grace_s: float = 30.0,
    ) -> None:
        self._settings = settings
        self._runtime = runtime
        self._redis = redis
        self._metrics = metrics
        self._ensure_network = ensure_network
        self._target = settings.network_sandboxes
        self._networks: dict[str, None] = {settings.docker_network: None}
        self._wake = asyncio.Event()
        self._leak_grace_s = leak_grace_s
        self._suspects: dict[str, float] = {}
        """Sandboxes seen neither ready nor joined, and since when (monotonic seconds)."""

    @property
    def enabled(self) -> bool:
        """Sandboxes are kept (a target above 0, the engine's default runtime: another
        runtime such as gVisor's sets its network up its own way)."""
        return self._target > 0 and self._settings.container_runtime in (None, "runc")

    def _key(self, network: str) -> str:
        return netns_free_key(self._settings.deployment_id, network)

    async def claim(self, network: str) -> str | None:
        """A ready sandbox's container id on ``network``, taken from the list (never given
        to anyone else), or None: none ready, sandboxes off, or Redis unreachable."""
        if not self.enabled:
            return None
        if network not in self._networks and network in self._known_networks():
            self._networks[network] = None
        try:
            raw = await self._redis.lpop(self._key(network))
        except (RedisError, OSError) as exc:
            logger.warning("network sandboxes: claim skipped, redis: %s", exc)
            self._metrics.netns_claims.labels(result="redis").inc()
            return None
        self._wake.set()
        if raw is None:
            self._metrics.netns_claims.labels(result="empty").inc()
            return None
        self._metrics.netns_claims.labels(result="claimed").inc()
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def discard(self, sandbox_id: str) -> None:
        """Remove a sandbox a container could not join (best effort: the sweep removes it
        otherwise)."""
        with contextlib.suppress(DependencyUnavailable):
            await self._runtime.remove(sandbox_id)

    def spec(self, network: str, name: str) -> ContainerSpec:
        """A sandbox on ``network``: the session image running ``sleep``, as nobody, with no
        capability, a read-only root and small limits; the sessions' extra hosts."""
        s = self._settings
        return ContainerSpec(
            name=name,
            image=s.image,
            env={},
            labels={LABEL_HELPER: HELPER, LABEL_NETWORK: network},
            mounts=[],
            network=network,
            memory="16m",
            cpus=0.05,
            pids=4,
            nofile=64,
            user="65534:65534",
            read_only=True,
            extra_hosts=s.container_extra_hosts,
            entrypoint=["/usr/bin/tini", "--", "sleep", "infinity"],
        )

    async def run(self) -> None:
        """Refill every network in use up to the target, then wait for a claim (or
        ``_IDLE_S``). Docker or Redis failures back off and retry; runs until cancelled."""
        if not self.enabled:
            await asyncio.Event().wait()
        backoff = 0.5
        while True:
            try:
                for network in list(self._networks):
                    await self._refill(network)
                backoff = 0.5
            except (DependencyUnavailable, ContainerStartFailed, RedisError, OSError) as exc:
                logger.warning(
                    "network sandboxes: refill failed (retry in %.1fs): %s", backoff, exc
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _IDLE_S)
            # A claim just started a container: its CLI's boot would share the CPU with the
            # refill's (Docker's network set-up is the costly part), so the refill waits a
            # little instead of slowing down the start it just sped up.
            await asyncio.sleep(_REFILL_DELAY_S)

    async def _refill(self, network: str) -> None:
        key = self._key(network)
        missing = self._target - int(await self._redis.llen(key))
        if missing <= 0:
            return
        await self._ensure_network()
        for _ in range(missing):
            info = await self._runtime.start(self.spec(network, _name(network)))
            try:
                await self._redis.rpush(key, info.id)
            except (RedisError, OSError):
                await self.discard(info.id)
                raise

    async def sweep(self) -> int:
        """Remove leaked sandboxes and drop dead list entries; returns how many sandboxes were
        removed. Raises DependencyUnavailable (docker) or RedisError."""
        containers = await self._runtime.list_managed()
        sandboxes = {c.id: c for c in containers if c.labels.get(LABEL_HELPER) == HELPER}
        joined = {c.labels[LABEL_NETNS] for c in containers if LABEL_NETNS in c.labels}
        ready: set[str] = set()
        for network in self._known_networks():
            key = self._key(network)
            for raw in await self._redis.lrange(key, 0, -1):
                sandbox_id = raw.decode() if isinstance(raw, bytes) else str(raw)
                found = sandboxes.get(sandbox_id)
                if found is None or found.state is not ContainerState.RUNNING:
                    await self._redis.lrem(key, 0, sandbox_id)
                else:
                    ready.add(sandbox_id)
        now = time.monotonic()
        loose = {sid for sid in sandboxes if sid not in ready and sid not in joined}
        self._suspects = {sid: self._suspects.get(sid, now) for sid in loose}
        removed = 0
        for sandbox_id, since in list(self._suspects.items()):
            if now - since < self._leak_grace_s:
                continue
            logger.info("network sandboxes: removing unused sandbox %s", sandbox_id[:12])
            await self._runtime.remove(sandbox_id)
            del self._suspects[sandbox_id]
            removed += 1
        return removed

    async def ready_counts(self) -> list[tuple[dict[str, str], float]]:
        """Ready sandboxes per network (for /metrics)."""
        return [
            ({"network": network}, float(await self._redis.llen(self._key(network))))
            for network in self._known_networks()
        ]

    def _known_networks(self) -> list[str]:
        s = self._settings
        return [s.docker_network, open_network(s)]


def _name(network: str) -> str:
    return f"ccgate-netns-{network}-{uuid.uuid4().hex[:12]}"
