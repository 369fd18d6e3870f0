"""Persistent workspaces, per-turn timeouts, and the reaper's reconciliation with Docker."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import docker
import pytest
from websockets.asyncio.client import connect

from tests.conftest import IMAGE, Api
from tests.e2e.helpers import collect_until

pytestmark = pytest.mark.e2e


async def _run(api: Api, sid: str, prompt: str, **extra: Any) -> dict[str, Any]:
    r = await api.http.post(
        f"/api/v1/sessions/{sid}/chat", json={"prompt": prompt, "stream": False, **extra}
    )
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


async def _eventually(check: Any, timeout_s: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.25)


async def test_a_persistent_workspace_outlives_its_session_and_stays_with_its_owner(
    make_api: Any, docker_client: docker.DockerClient
) -> None:
    alice: Api = make_api()
    bob: Api = make_api()
    workspace = {"type": "persistent", "id": "project-x"}
    first = (await alice.http.post("/api/v1/sessions", json={"workspace": workspace})).json()
    await _run(alice, first["session_id"], "write notes.md kept between sessions")
    assert (await alice.http.delete(f"/api/v1/sessions/{first['session_id']}")).status_code == 204

    second = (await alice.http.post("/api/v1/sessions", json={"workspace": workspace})).json()
    shown = await _run(alice, second["session_id"], "bash cat /workspace/notes.md")
    assert shown["result"] == "Output: kept between sessions"
    session = (await alice.http.get(f"/api/v1/sessions/{second['session_id']}")).json()
    assert session["workspace"] == workspace

    other = (await bob.http.post("/api/v1/sessions", json={"workspace": workspace})).json()
    listing = await _run(bob, other["session_id"], "bash ls -A /workspace | wc -l")
    assert listing["result"] == "Output: 0"


async def test_a_turn_over_its_timeout_is_interrupted(make_api: Any) -> None:
    api: Api = make_api()
    sid = (await api.http.post("/api/v1/sessions", json={})).json()["session_id"]
    async with connect(api.stream_url(sid), max_size=None) as ws:
        result = await _run(api, sid, "slow 60", timeout_seconds=2)
        assert result["status"] == "interrupted"
        assert result["subtype"] == "error_during_execution"
        events = await collect_until(
            ws, lambda e: e["type"] == "error" and e["data"]["code"] == "turn_timeout"
        )
    assert events[-1]["turn_id"] == result["message_id"]


async def test_orphan_containers_and_volumes_are_removed_but_not_another_deployments(
    e2e_gateway: Any, docker_client: docker.DockerClient
) -> None:
    ghost = str(uuid.uuid4())
    labels = {
        "ccgate.managed": "true",
        "ccgate.deployment": e2e_gateway.settings.deployment_id,
        "ccgate.session_id": ghost,
        "ccgate.owner": "test-ghost",
    }
    volume = docker_client.volumes.create(f"ccgate-cfg-{ghost}", labels=labels)
    container = docker_client.containers.create(IMAGE, entrypoint=["sleep", "600"], labels=labels)
    container.start()
    neighbour = docker_client.containers.create(
        IMAGE, entrypoint=["sleep", "600"], labels=labels | {"ccgate.deployment": "elsewhere"}
    )
    neighbour.start()

    async def gone() -> bool:
        names = {v.name for v in docker_client.volumes.list(filters={"label": "ccgate.owner"})}
        try:
            docker_client.containers.get(container.id)
        except docker.errors.NotFound:
            return volume.name not in names
        return False

    try:
        await _eventually(gone)
        neighbour.reload()
        assert neighbour.status == "running"  # another deployment's: never reaped
    finally:
        neighbour.remove(force=True)
