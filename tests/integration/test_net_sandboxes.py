"""Network sandboxes on real Docker and real Redis: refill, claims across replicas, joining,
removal with the joined container, the leak sweep, and Redis down."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
import redis.asyncio as aioredis

from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.services.net_sandboxes import NetworkSandboxes
from gateway.services.network import SessionsNetwork
from gateway.services.runtime.base import LABEL_DEPLOYMENT, LABEL_NETNS, ContainerSpec
from gateway.services.runtime.docker import DockerRuntime
from tests.conftest import IMAGE, make_settings
from tests.containers import RedisContainer
from tests.servers import free_port
from wrapper.protocol import netns_free_key


@dataclass
class Replica:
    """One gateway replica's sandboxes, with what the test reads beside them."""

    sandboxes: NetworkSandboxes
    settings: Settings
    redis: aioredis.Redis
    metrics: Metrics

    @property
    def key(self) -> str:
        return netns_free_key(self.settings.deployment_id, self.settings.docker_network)

    async def ready(self, at_least: int) -> None:
        deadline = time.monotonic() + 60
        while int(await self.redis.llen(self.key)) < at_least:
            assert time.monotonic() < deadline, f"fewer than {at_least} ready sandboxes"
            await asyncio.sleep(0.1)

    async def refill_until(self, at_least: int) -> None:
        task = asyncio.create_task(self.sandboxes.run())
        try:
            await self.ready(at_least)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


Make = Callable[..., Replica]


@pytest.fixture
def deployment() -> str:
    return f"test-netns-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def make_sandboxes(
    tmp_path: Path,
    redis_server: RedisContainer,
    deployment: str,
    docker_client: docker.DockerClient,
) -> AsyncIterator[Make]:
    """Factory of NetworkSandboxes ("replicas" of one deployment on one Redis); removes every
    container of the deployment afterwards."""
    clients: list[aioredis.Redis] = []

    def make(
        target: int = 2, redis_url: str | None = None, image: str = IMAGE, **kw: float
    ) -> Replica:
        settings = make_settings(
            tmp_path,
            redis_url=redis_server.url,
            deployment=deployment,
            network_sandboxes=target,
            image=image,
        )
        runtime = DockerRuntime(deployment=deployment)
        client = aioredis.Redis.from_url(redis_url or redis_server.url, socket_timeout=2)
        clients.append(client)
        metrics = Metrics()
        network = SessionsNetwork(settings, runtime)
        sandboxes = NetworkSandboxes(settings, runtime, client, metrics, network.ensure, **kw)
        return Replica(sandboxes, settings, client, metrics)

    yield make
    for client in clients:
        with contextlib.suppress(Exception):
            await client.aclose()
    for container in docker_client.containers.list(
        all=True, filters={"label": f"{LABEL_DEPLOYMENT}={deployment}"}
    ):
        container.remove(force=True)


async def test_refilled_sandboxes_are_hardened_and_a_claim_is_never_shared(
    make_sandboxes: Make, docker_client: docker.DockerClient
) -> None:
    one, two = make_sandboxes(target=3), make_sandboxes(target=3)
    tasks = [asyncio.create_task(r.sandboxes.run()) for r in (one, two)]
    try:
        await one.ready(3)
        network = one.settings.docker_network
        claims = await asyncio.gather(
            *(r.sandboxes.claim(network) for r in (one, two) for _ in range(6))
        )
        taken = [c for c in claims if c is not None]
        assert len(taken) >= 3 and len(set(taken)) == len(taken), claims
        for sandbox_id in taken:
            attrs = docker_client.containers.get(sandbox_id).attrs
            host = attrs["HostConfig"]
            assert attrs["State"]["Running"] is True
            assert attrs["Config"]["User"] == "65534:65534"
            assert host["CapDrop"] == ["ALL"] and host["ReadonlyRootfs"] is True
            assert host["Memory"] == 16 * 1024 * 1024 and host["PidsLimit"] == 4
            assert host["NetworkMode"] == network
            assert any(h.startswith("host.docker.internal:") for h in host["ExtraHosts"])
        await one.ready(3)  # the claims woke the refill
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _joining(replica: Replica, sandbox_id: str) -> ContainerSpec:
    s = replica.settings
    return ContainerSpec(
        name=f"ccgate-test-joined-{uuid.uuid4().hex[:8]}",
        image=IMAGE,
        env={},
        labels={},
        mounts=[],
        network=s.docker_network,
        memory="64m",
        cpus=0.5,
        pids=16,
        user="1000:1000",
        extra_hosts=s.container_extra_hosts,  # the sandbox's apply: Docker refuses both
        network_from=sandbox_id,
        entrypoint=["sleep", "60"],
    )


async def test_a_container_in_a_sandbox_shares_its_network_and_takes_it_along(
    make_sandboxes: Make, docker_client: docker.DockerClient
) -> None:
    replica = make_sandboxes(target=1)
    await replica.refill_until(1)
    network = replica.settings.docker_network
    sandbox_id = await replica.sandboxes.claim(network)
    assert sandbox_id is not None
    runtime = DockerRuntime(deployment=replica.settings.deployment_id)
    info = await runtime.start(_joining(replica, sandbox_id))
    joined = docker_client.containers.get(info.id)
    assert joined.attrs["HostConfig"]["NetworkMode"] == f"container:{sandbox_id}"
    assert joined.labels[LABEL_NETNS] == sandbox_id
    code, hosts = joined.exec_run(["cat", "/etc/hosts"])
    assert code == 0 and b"host.docker.internal" in hosts
    sandbox = docker_client.containers.get(sandbox_id)
    address = sandbox.attrs["NetworkSettings"]["Networks"][network]["IPAddress"]
    code, routes = joined.exec_run(["cat", "/proc/net/fib_trie"])
    assert code == 0 and address.encode() in routes  # the sandbox's address is its own
    await runtime.remove(info.id)
    for gone in (info.id, sandbox_id):
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(gone)


async def test_the_sweep_removes_leaks_after_the_grace_and_drops_dead_entries(
    make_sandboxes: Make, docker_client: docker.DockerClient
) -> None:
    replica = make_sandboxes(target=3, leak_grace_s=0.5)
    await replica.refill_until(3)
    network = replica.settings.docker_network
    leaked = await replica.sandboxes.claim(network)  # claimed, never joined
    dead = await replica.sandboxes.claim(network)
    assert leaked is not None and dead is not None
    kept = (await replica.redis.lrange(replica.key, 0, -1))[0].decode()
    # ``dead`` is listed again after it was removed behind the gateway's back.
    docker_client.containers.get(dead).remove(force=True)
    await replica.redis.rpush(replica.key, dead)

    assert await replica.sandboxes.sweep() == 0  # first look: only suspected
    assert [r.decode() for r in await replica.redis.lrange(replica.key, 0, -1)] == [kept]
    docker_client.containers.get(leaked)  # still there
    await asyncio.sleep(0.6)
    assert await replica.sandboxes.sweep() == 1
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(leaked)
    assert docker_client.containers.get(kept).attrs["State"]["Running"] is True


async def test_a_joined_sandbox_is_never_swept(
    make_sandboxes: Make, docker_client: docker.DockerClient
) -> None:
    replica = make_sandboxes(target=1, leak_grace_s=0.0)
    await replica.refill_until(1)
    sandbox_id = await replica.sandboxes.claim(replica.settings.docker_network)
    assert sandbox_id is not None
    runtime = DockerRuntime(deployment=replica.settings.deployment_id)
    info = await runtime.start(_joining(replica, sandbox_id))
    for _ in range(2):
        assert await replica.sandboxes.sweep() == 0
    assert docker_client.containers.get(sandbox_id).attrs["State"]["Running"] is True
    await runtime.remove(info.id)


async def test_redis_down_means_no_sandbox_not_an_error(make_sandboxes: Make) -> None:
    replica = make_sandboxes(target=2, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert await replica.sandboxes.claim(replica.settings.docker_network) is None
    assert replica.metrics.netns_claims.labels(result="redis")._value.get() == 1


async def test_a_refill_that_cannot_start_a_sandbox_backs_off_and_lives_on(
    make_sandboxes: Make,
) -> None:
    replica = make_sandboxes(target=1, image="ccgate-no-such-image:latest")
    task = asyncio.create_task(replica.sandboxes.run())
    await asyncio.sleep(2.0)
    assert not task.done()  # failed starts are retried, not raised into the supervisor
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert int(await replica.redis.llen(replica.key)) == 0
