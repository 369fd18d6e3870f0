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

from gateway.services.runtime.firewall import bridge_name
from scripted_model import ScriptedModelServer
from tests.conftest import Api
from tests.containers import PostgresContainer, RedisContainer

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
        f"{_ip(b, network)}:8099": "blocked",  # another session's container
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
    assert list(container.attrs["NetworkSettings"]["Networks"]) == [network]
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
