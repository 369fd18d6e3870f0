"""The sessions network seen from inside a session container, as the agent's uid: the gateway
and its own Redis answer; host ports, other containers and other networks do not."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from typing import Any

import docker
import pytest
import redis.asyncio as aioredis

from gateway.services.runtime.firewall import bridge_name
from scripted_model import ScriptedModelServer
from tests.conftest import Api
from tests.containers import PostgresContainer, RedisContainer
from wrapper.protocol import netns_free_key

pytestmark = pytest.mark.e2e

# Tries each (host, port) for up to 3 s and prints {"host:port": "open" | "blocked"}.
_PROBE = """
import json, socket, sys
out = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        out[target] = "open"
    except OSError:
        out[target] = "blocked"
print(json.dumps(out))
"""


def _probe(container: Any, targets: list[str]) -> dict[str, str]:
    _, out = container.exec_run(["python3", "-c", _PROBE, *targets], user="1000")
    result: dict[str, str] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def _network_holder(client: docker.DockerClient, container: Any) -> Any:
    """The container that holds ``container``'s network namespace: its network sandbox when it
    joined one (``container:<id>``), else itself."""
    container.reload()
    mode = str(container.attrs["HostConfig"]["NetworkMode"])
    if mode.startswith("container:"):
        return client.containers.get(mode.split(":", 1)[1])
    return container


def _ip(container: Any, network: str) -> str:
    container.reload()
    return str(container.attrs["NetworkSettings"]["Networks"][network]["IPAddress"])


async def test_a_session_reaches_the_gateway_and_its_redis_and_nothing_else(
    make_api: Any,
    docker_client: docker.DockerClient,
    scripted_model: ScriptedModelServer,
    postgres_server: PostgresContainer,
    redis_server: RedisContainer,
) -> None:
    api: Api = make_api()
    sids = []
    for _ in range(2):
        r = await api.http.post("/api/v1/sessions", json={})
        assert r.status_code == 201, r.text
        sids.append(r.json()["session_id"])
    # Both ready (the wrapper reached Redis, the CLI answered through the model proxy).
    for sid in sids:
        done = await api.http.post(
            f"/api/v1/sessions/{sid}/chat", json={"prompt": "echo up", "stream": False}
        )
        assert done.json()["status"] == "completed", done.text
    a, b = (docker_client.containers.get(f"ccgate-{sid}") for sid in sids)
    network = api.gateway.settings.docker_network
    assert docker_client.networks.get(network).attrs["Internal"] is True

    # A listener in B (as uid 1000, in its writable /tmp) that B itself reaches.
    b.exec_run(
        ["sh", "-c", "cd /tmp && exec python3 -m http.server 8099 >/dev/null 2>&1"],
        user="1000",
        detach=True,
    )
    deadline = time.monotonic() + 10
    while _probe(b, ["127.0.0.1:8099"])["127.0.0.1:8099"] != "open":
        assert time.monotonic() < deadline, "the listener in B did not start"
        await asyncio.sleep(0.2)

    redis_ip = _ip(
        docker_client.containers.get(redis_server.container.get_wrapped_container().id), "bridge"
    )  # type: ignore[union-attr]
    host = "host.docker.internal"
    targets = {
        f"{host}:{api.gateway.port}": "open",  # the gateway: model proxy and API
        f"{host}:{redis_server.port}": "open",  # its Redis (a published port)
        f"{host}:{scripted_model.port}": "blocked",  # another server on the host
        f"{host}:{postgres_server.port}": "blocked",  # the database's published port
        # another session's container (through its sandbox's address)
        f"{_ip(_network_holder(docker_client, b), network)}:8099": "blocked",
        f"{redis_ip}:6379": "blocked",  # a container on another network, directly
    }
    assert _probe(a, list(targets)) == targets

    # The rules behind it: the chain exists and the bridge carries its name.
    rules = (
        await asyncio.to_thread(
            subprocess.run,
            ["iptables", "-S", "DOCKER-USER"],
            capture_output=True,
            text=True,
            check=True,
        )
    ).stdout
    assert f"-i {bridge_name(network)} -j CCGATE-" in rules


async def test_an_open_session_reaches_no_private_address_and_no_other_host_port(
    make_api: Any,
    docker_client: docker.DockerClient,
    scripted_model: ScriptedModelServer,
    postgres_server: PostgresContainer,
    redis_server: RedisContainer,
) -> None:
    """``egress: open`` puts the session on a network with a route out (Docker's NAT); the
    firewall still refuses the host's ports (but the gateway's and Redis's) and every private,
    loopback and link-local destination. (Tests send no traffic beyond this machine, so the
    internet side is checked as the route, not by a connection.)"""
    api: Api = make_api()
    r = await api.http.post("/api/v1/sessions", json={"config": {"egress": {"policy": "open"}}})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    done = await api.http.post(
        f"/api/v1/sessions/{sid}/chat", json={"prompt": "echo open", "stream": False}
    )
    assert done.json()["status"] == "completed", done.text
    container = docker_client.containers.get(f"ccgate-{sid}")
    network = f"{api.gateway.settings.docker_network}-open"
    holder = _network_holder(docker_client, container)
    assert list(holder.attrs["NetworkSettings"]["Networks"]) == [network]
    assert docker_client.networks.get(network).attrs["Internal"] is False
    assert redis_server.container is not None
    service = redis_server.container.get_wrapped_container()
    redis_ip = _ip(docker_client.containers.get(service.id), "bridge")
    host = "host.docker.internal"
    targets = {
        f"{host}:{api.gateway.port}": "open",
        f"{host}:{redis_server.port}": "open",
        f"{host}:{scripted_model.port}": "blocked",
        f"{host}:{postgres_server.port}": "blocked",
        f"{redis_ip}:6379": "blocked",  # a private address on another network
    }
    assert _probe(container, list(targets)) == targets
    _, out = container.exec_run(["cat", "/proc/net/route"])
    assert any(line.split()[1] == "00000000" for line in out.decode().splitlines()[1:])


async def _free_sandboxes(redis_url: str, key: str, at_least: int) -> list[str]:
    """The ready sandboxes' ids once at least ``at_least`` are listed (60 s at most)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 60
        while True:
            ids = [raw.decode() for raw in await client.lrange(key, 0, -1)]
            if len(ids) >= at_least:
                return ids
            assert time.monotonic() < deadline, f"fewer than {at_least} ready sandboxes: {ids}"
            await asyncio.sleep(0.2)
    finally:
        await client.aclose()


async def test_a_session_starts_in_a_ready_network_sandbox_and_takes_it_along(
    make_api: Any, docker_client: docker.DockerClient, redis_server: RedisContainer
) -> None:
    """A cold start joins a network sandbox made ahead of time (no network set-up of its own)
    and works like any session; deleting the session removes its sandbox; the refill makes
    another."""
    api: Api = make_api()
    s = api.gateway.settings
    key = netns_free_key(s.deployment_id, s.docker_network)
    before = await _free_sandboxes(redis_server.url, key, s.network_sandboxes)
    r = await api.http.post("/api/v1/sessions", json={})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    done = await api.http.post(
        f"/api/v1/sessions/{sid}/chat", json={"prompt": "echo joined", "stream": False}
    )
    assert done.json()["status"] == "completed", done.text
    container = docker_client.containers.get(f"ccgate-{sid}")
    sandbox = _network_holder(docker_client, container)
    assert sandbox.id in before and sandbox.labels["ccgate.helper"] == "netns"
    assert container.labels["ccgate.netns"] == sandbox.id
    assert list(sandbox.attrs["NetworkSettings"]["Networks"]) == [s.docker_network]
    r = await api.http.delete(f"/api/v1/sessions/{sid}")
    assert r.status_code == 204, r.text
    for gone in (container.id, sandbox.id):
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(gone)
    after = await _free_sandboxes(redis_server.url, key, s.network_sandboxes)
    assert sandbox.id not in after


async def test_a_listed_sandbox_that_died_costs_a_start_nothing(
    make_api: Any, docker_client: docker.DockerClient, redis_server: RedisContainer
) -> None:
    """Every ready sandbox removed behind the gateway's back: the next sessions find dead
    ones, remove them, start on their own network, and work."""
    api: Api = make_api()
    s = api.gateway.settings
    key = netns_free_key(s.deployment_id, s.docker_network)
    for sandbox_id in await _free_sandboxes(redis_server.url, key, s.network_sandboxes):
        docker_client.containers.get(sandbox_id).remove(force=True)
    r = await api.http.post("/api/v1/sessions", json={})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    done = await api.http.post(
        f"/api/v1/sessions/{sid}/chat", json={"prompt": "echo fell back", "stream": False}
    )
    assert done.json()["status"] == "completed", done.text
    container = docker_client.containers.get(f"ccgate-{sid}")
    assert _network_holder(docker_client, container) is container  # its own network
    metrics = (await api.http.get("/metrics")).text
    failed = [
        line
        for line in metrics.splitlines()
        if line.startswith('ccgate_network_sandbox_claims_total{result="failed"}')
    ]
    assert failed and float(failed[0].split()[-1]) >= 1, failed
