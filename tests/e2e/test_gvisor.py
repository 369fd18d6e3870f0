"""A session under gVisor (CCGATE_CONTAINER_RUNTIME=runsc): the same hardening, the real CLI,
a whole turn with a tool call and an artifact, the model through the proxy, Redis through the
firewall. scripts/test.sh asks the setup script to install and register runsc."""

from __future__ import annotations

from collections.abc import Iterator

import docker
import httpx
import pytest

from gateway.auth import mint_token
from scripted_model import ScriptedModelServer
from tests.conftest import JWT_SECRET, full_stack_settings
from tests.containers import PostgresContainer, RedisContainer, S3Container
from tests.servers import GatewayServer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gvisor_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
    s3_server: S3Container,
    scripted_model: ScriptedModelServer,
    docker_client: docker.DockerClient,
) -> Iterator[GatewayServer]:
    assert "runsc" in docker_client.info()["Runtimes"], "runsc is not registered with Docker"
    gateway = GatewayServer(
        full_stack_settings(
            tmp_path_factory.mktemp("gw-gvisor"),
            redis_server,
            postgres_server,
            s3_server,
            scripted_model,
            container_runtime="runsc",
        )
    ).start()
    yield gateway
    gateway.stop()


async def test_a_session_runs_end_to_end_under_gvisor(
    gvisor_gateway: GatewayServer, docker_client: docker.DockerClient
) -> None:
    token = mint_token(key=JWT_SECRET, user="test-gvisor", ttl_s=600)
    async with httpx.AsyncClient(
        base_url=gvisor_gateway.url, headers={"Authorization": f"Bearer {token}"}, timeout=120
    ) as http:
        r = await http.post("/api/v1/sessions", json={})
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
        try:
            container = docker_client.containers.get(f"ccgate-{sid}")
            assert container.attrs["HostConfig"]["Runtime"] == "runsc"
            wrote = await http.post(
                f"/api/v1/sessions/{sid}/chat",
                json={"prompt": "write gvisor.txt written under gVisor", "stream": False},
            )
            assert wrote.json()["status"] == "completed", wrote.text
            assert wrote.json()["cost_usd"] > 0  # metered by the proxy
            kernel = await http.post(
                f"/api/v1/sessions/{sid}/chat",
                json={"prompt": "bash dmesg | head -n 1; id -u", "stream": False},
            )
            output = kernel.json()["result"] or ""
            assert "gVisor" in output and output.split()[-1] == "1000", output
            artifact = await http.get(f"/api/v1/sessions/{sid}/artifacts/gvisor.txt")
            assert artifact.status_code == 200 and b"under gVisor" in artifact.content
        finally:
            await http.delete(f"/api/v1/sessions/{sid}")
