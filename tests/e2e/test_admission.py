"""Admission control: per-user limits answered with 429 + Retry-After, or a fair queue that
admits when room frees; other users unaffected (real Docker, the real CLI, scripted model)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from websockets.asyncio.client import connect

from scripted_model import ScriptedModelServer
from tests.conftest import Api, full_stack_settings
from tests.containers import PostgresContainer, RedisContainer, S3Container
from tests.e2e.helpers import final_message
from tests.servers import GatewayServer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def limited_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
    s3_server: S3Container,
    scripted_model: ScriptedModelServer,
    docker_client: docker.DockerClient,
) -> Iterator[GatewayServer]:
    """Two live sessions per user; its own SQLite database, so its own deployment (and its
    own lifecycle lease: replicas of one deployment share their settings)."""
    settings = full_stack_settings(
        Path(tmp_path_factory.mktemp("gw-admission")),
        redis_server,
        postgres_server,
        s3_server,
        scripted_model,
        database_url=None,
        max_live_sessions_per_user=2,
        lifecycle_interval_s=0.5,
        turn_silence_s=2,
    )
    gateway = GatewayServer(settings).start()
    yield gateway
    gateway.stop()


@pytest.fixture
async def users(limited_gateway: GatewayServer) -> AsyncIterator[list[Api]]:
    made = [Api(limited_gateway, f"test-{uuid.uuid4().hex[:8]}") for _ in range(2)]
    yield made
    for api in made:
        listing = (await api.http.get("/api/v1/sessions", params={"limit": 500})).json()
        for session in listing["sessions"]:
            await api.http.delete(f"/api/v1/sessions/{session['session_id']}")
        await api.http.aclose()


async def _create(api: Api, **params: Any) -> Any:
    return await api.http.post("/api/v1/sessions", json={}, params=params)


async def _until(api: Api, sid: str, status: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body: dict[str, Any] = (await api.http.get(f"/api/v1/sessions/{sid}")).json()
        if body["status"] == status:
            return body
        assert time.monotonic() < deadline, f"{sid} is {body['status']}, not {status}"
        await asyncio.sleep(0.2)


async def test_over_the_per_user_limit_a_create_is_refused_or_queued_fairly(
    users: list[Api],
) -> None:
    alice, bob = users
    first = (await _create(alice)).json()["session_id"]
    second = (await _create(alice)).json()["session_id"]
    refused = await _create(alice)
    assert refused.status_code == 429, refused.text
    assert refused.headers["Retry-After"] == "5"
    body = refused.json()
    assert body["code"] == "admission_refused"
    assert "CCGATE_MAX_LIVE_SESSIONS_PER_USER=2" in body["detail"]
    # Another user is not affected.
    assert (await _create(bob)).status_code == 201
    # Asking to queue: the session waits with its place, and its prompt waits with it.
    queued = await _create(alice, queue="true")
    assert queued.status_code == 201, queued.text
    waiting = queued.json()
    assert waiting["status"] == "queued" and waiting["queue_position"] == 1
    sid = waiting["session_id"]
    chat = await alice.http.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "queued hello"})
    assert chat.status_code == 202, chat.text
    await asyncio.sleep(1.5)  # several lifecycle passes: still no room
    assert (await alice.http.get(f"/api/v1/sessions/{sid}")).json()["status"] == "queued"
    # Room frees (a session paused): the queued one starts and answers its prompt.
    await _until(alice, first, "idle")
    assert (await alice.http.post(f"/api/v1/sessions/{first}/pause")).status_code == 200
    done = await final_message(alice.http, sid, chat.json()["message_id"], timeout_s=90)
    assert done["status"] == "completed" and done["result"] == "Echo: queued hello"
    started = (await alice.http.get(f"/api/v1/sessions/{sid}")).json()
    assert started["queue_position"] is None and started["container_id"]
    # The paused one cannot resume now (alice has two live again): 429, or queue its prompt.
    again = await alice.http.post(f"/api/v1/sessions/{first}/chat", json={"prompt": "x"})
    assert again.status_code == 429 and "PER_USER=2" in again.json()["detail"]
    async with connect(alice.stream_url(first), max_size=None) as ws:
        await ws.send(json.dumps({"type": "prompt", "prompt": "x", "id": "p1"}))
        answer: dict[str, Any] = {}
        while answer.get("type") != "error" or "seq" in answer:  # replayed events have a seq
            answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert answer["code"] == "admission_refused" and answer["retry_after"] == 5, answer
    kept = await alice.http.post(
        f"/api/v1/sessions/{first}/chat", params={"queue": "true"}, json={"prompt": "later"}
    )
    assert kept.status_code == 202, kept.text
    paused = await _until(alice, first, "paused")
    deadline = time.monotonic() + 10
    while paused["queue_position"] != 1:
        assert time.monotonic() < deadline, paused
        await asyncio.sleep(0.2)
        paused = (await alice.http.get(f"/api/v1/sessions/{first}")).json()
    assert (await alice.http.post(f"/api/v1/sessions/{second}/stop")).status_code == 200
    resumed = await final_message(alice.http, first, kept.json()["message_id"], timeout_s=90)
    assert resumed["status"] == "completed" and resumed["result"] == "Echo: later"


async def test_a_silent_turn_is_flagged_once(users: list[Api]) -> None:
    """The no-output watchdog (CCGATE_TURN_SILENCE_S, 2 s here): a turn whose stream stays
    quiet gets one ``turn_silent`` notice."""
    alice, _ = users
    sid = (await _create(alice)).json()["session_id"]
    await _until(alice, sid, "idle")
    async with connect(alice.stream_url(sid), max_size=None) as ws:
        r = await alice.http.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "slow 8"})
        message_id = r.json()["message_id"]
        notices: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if message.get("type") == "turn_silent":
                notices.append(message)
            if message.get("type") == "turn_completed":
                break
            assert time.monotonic() < deadline
    assert len(notices) == 1, notices
    assert notices[0]["message_id"] == message_id and notices[0]["silent_s"] >= 2


async def test_over_the_active_prompt_limit_a_chat_is_refused_and_nothing_is_kept(
    tmp_path: Path,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
    s3_server: S3Container,
    scripted_model: ScriptedModelServer,
    docker_client: docker.DockerClient,
) -> None:
    """max_active_turns_per_user=2: a running and a queued prompt fill it; the third chat is
    429 naming the setting (checked inside the turn's INSERT), and no turn row is left."""
    settings = full_stack_settings(
        tmp_path, redis_server, postgres_server, s3_server, scripted_model,
        database_url=None, max_active_turns_per_user=2,
    )  # fmt: skip
    gateway = GatewayServer(settings).start()
    api = Api(gateway, f"test-{uuid.uuid4().hex[:8]}")
    try:
        sid = (await _create(api)).json()["session_id"]
        for prompt in ("slow 4", "echo queued"):
            r = await api.http.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": prompt})
            assert r.status_code == 202, r.text
        refused = await api.http.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "no"})
        assert refused.status_code == 429, refused.text
        assert refused.json()["code"] == "admission_refused"
        assert "CCGATE_MAX_ACTIVE_TURNS_PER_USER=2" in refused.json()["detail"]
        # Once they finish there is room again; the refused prompt left no turn behind.
        await _until(api, sid, "idle", timeout_s=60)
        deadline = time.monotonic() + 30
        while (await api.http.get(f"/api/v1/sessions/{sid}")).json()["total_turns"] != 2:
            assert time.monotonic() < deadline, "the two turns were never recorded"
            await asyncio.sleep(0.2)
        done = await api.http.post(
            f"/api/v1/sessions/{sid}/chat", json={"prompt": "echo again", "stream": False}
        )
        assert done.json()["result"] == "Echo: echo again", done.text
        assert (await api.http.get(f"/api/v1/sessions/{sid}")).json()["total_turns"] == 3
        await api.http.delete(f"/api/v1/sessions/{sid}")
    finally:
        await api.http.aclose()
        gateway.stop()
