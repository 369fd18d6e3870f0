"""Soak: 200 create / chat / delete cycles, with containers killed at random moments, leave no
ccgate container and no volume behind (real Docker, the real CLI, the scripted model)."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

import docker
import pytest

from tests.conftest import Api

pytestmark = pytest.mark.e2e

CYCLES = 200
CONCURRENCY = 5


def _leftovers(client: docker.DockerClient, owner: str) -> tuple[list[Any], list[Any]]:
    containers = client.containers.list(all=True, filters={"label": f"ccgate.owner={owner}"})
    volumes = client.volumes.list(filters={"label": f"ccgate.owner={owner}"})
    return containers, volumes


def _kill(client: docker.DockerClient, container_id: str | None) -> None:
    if not container_id:
        return
    try:
        client.containers.get(container_id).kill()
    except docker.errors.APIError:
        pass  # already gone or not running: the race is part of the test


async def _cycle(api: Api, client: docker.DockerClient, rng: random.Random) -> str:
    """One create / chat / delete, with a kill at a random moment in a third of them."""
    created = await api.http.post("/api/v1/sessions", json={})
    assert created.status_code == 201, created.text
    sid = created.json()["session_id"]
    container = created.json()["container_id"]
    moment = rng.choice(["none", "none", "after_create", "mid_chat", "before_delete"])
    if moment == "after_create":
        await asyncio.to_thread(_kill, client, container)
    chat = api.http.post(
        f"/api/v1/sessions/{sid}/chat", json={"prompt": "echo soak", "stream": False}
    )
    if moment == "mid_chat":
        pending = asyncio.ensure_future(chat)
        await asyncio.sleep(rng.uniform(0.0, 0.5))
        await asyncio.to_thread(_kill, client, container)
        answer = await pending
    else:
        answer = await chat
    # A chat answers with a result, or — the container died before it could — a clear error.
    assert answer.status_code in (200, 409, 429, 503, 504), answer.text
    if moment == "before_delete":
        current = (await api.http.get(f"/api/v1/sessions/{sid}")).json()["container_id"]
        await asyncio.to_thread(_kill, client, current)
    deleted = await api.http.delete(f"/api/v1/sessions/{sid}")
    assert deleted.status_code == 204, deleted.text
    return moment


@pytest.mark.timeout(1800)
async def test_two_hundred_cycles_with_random_kills_leave_nothing_behind(
    make_api: Any, docker_client: docker.DockerClient
) -> None:
    api: Api = make_api()
    rng = random.Random(int(uuid.uuid4().int % 2**32))
    semaphore = asyncio.Semaphore(CONCURRENCY)
    moments: list[str] = []

    started = time.monotonic()

    async def one() -> None:
        async with semaphore:
            moments.append(await _cycle(api, docker_client, rng))
            if len(moments) % 20 == 0:
                print(f"soak: {len(moments)} cycles in {time.monotonic() - started:.0f} s")

    await asyncio.gather(*(one() for _ in range(CYCLES)))
    assert len(moments) == CYCLES and moments.count("none") < CYCLES
    deadline = time.monotonic() + 60
    while True:
        containers, volumes = await asyncio.to_thread(_leftovers, docker_client, api.user)
        if not containers and not volumes:
            break
        assert time.monotonic() < deadline, (containers, [v.name for v in volumes])
        await asyncio.sleep(1)
    listing = (await api.http.get("/api/v1/sessions", params={"limit": 500})).json()
    assert listing["total"] == 0
