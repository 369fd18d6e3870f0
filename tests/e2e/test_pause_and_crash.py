"""Sessions that outlive their containers: killed mid-turn, paused when idle or on request,
resumed with the conversation intact (real Docker, the real CLI, the scripted model)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import docker
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import Api
from tests.e2e.helpers import collect_until, final_message, turn_done

pytestmark = pytest.mark.e2e


async def _run(api: Api, sid: str, prompt: str) -> dict[str, Any]:
    r = await api.http.post(
        f"/api/v1/sessions/{sid}/chat", json={"prompt": prompt, "stream": False}
    )
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


async def _session(api: Api, sid: str) -> dict[str, Any]:
    body: dict[str, Any] = (await api.http.get(f"/api/v1/sessions/{sid}")).json()
    return body


async def _until_status(api: Api, sid: str, status: str, timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body = await _session(api, sid)
        if body["status"] == status:
            return body
        assert time.monotonic() < deadline, f"{sid} still {body['status']}, wanted {status}"
        await asyncio.sleep(0.1)


def _session_containers(client: docker.DockerClient, sid: str) -> list[Any]:
    return list(client.containers.list(all=True, filters={"label": f"ccgate.session_id={sid}"}))


async def _events_until(ws: ClientConnection, kind: str, timeout_s: float = 60) -> list[Any]:
    return await collect_until(ws, lambda e: e["type"] == kind, timeout_s=timeout_s)


def _contiguous(events: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


async def test_a_container_killed_mid_turn_ends_the_turn_at_once_and_the_next_chat_remembers(
    make_api: Any, docker_client: docker.DockerClient
) -> None:
    api: Api = make_api()
    streaming = {"config": {"include_partial_messages": True}}
    sid = (await api.http.post("/api/v1/sessions", json=streaming)).json()["session_id"]
    assert (await _run(api, sid, "remember the blue door"))["status"] == "completed"
    old = (await _session(api, sid))["container_id"]
    async with connect(api.stream_url(sid), max_size=None) as ws:
        seen = await _events_until(ws, "turn_completed")
        r = await api.http.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "slow 60"})
        message_id = r.json()["message_id"]
        seen += await collect_until(
            ws, lambda e: e["type"] == "stream_event" and e["turn_id"] == message_id
        )
        killed_at = time.monotonic()
        await asyncio.to_thread(docker_client.containers.get(old).kill)
        seen += await collect_until(ws, turn_done(message_id), timeout_s=10)
        noticed_s = time.monotonic() - killed_at
        final = seen[-1]
        seen += await _events_until(ws, "exited", timeout_s=10)
        assert noticed_s < 2.0, f"the final event came {noticed_s:.2f}s after the kill"
        assert final["source"] == "gateway" and final["data"]["outcome"] == "killed", final
        assert final["data"]["subtype"] == "error_killed" and final["data"]["is_error"] is True
        assert seen[-1]["data"] == {
            "reason": "crashed",
            "cause": "killed",
            "exit_code": 137,
            "cli_exit_code": None,
            "ccgate_sig": seen[-1]["data"]["ccgate_sig"],
        }
        paused = await _until_status(api, sid, "paused")
        assert paused["paused_reason"] == "killed" and paused["container_id"] is None
        message = await final_message(api.http, sid, message_id)
        assert message["status"] == "failed" and message["outcome"] == "killed"
        # The next chat resumes the conversation in a new container.
        again = await _run(api, sid, "recall")
        assert again["result"] == "You first said: remember the blue door", again
        seen += await _events_until(ws, "turn_completed")
    _contiguous(seen)
    ready = [e for e in seen if e["type"] == "ready"]
    assert ready[-1]["data"]["resumed"] is True and ready[-1]["data"]["resume_ms"] > 0
    current = (await _session(api, sid))["container_id"]
    assert current != old

    def only_current() -> bool:
        return [c.id for c in _session_containers(docker_client, sid)] == [current]

    deadline = time.monotonic() + 30
    while not await asyncio.to_thread(only_current):
        assert time.monotonic() < deadline, "the killed container was never removed"
        await asyncio.sleep(0.5)


async def test_an_idle_session_is_paused_and_the_next_chat_resumes_it_without_a_gap(
    make_api: Any, docker_client: docker.DockerClient
) -> None:
    api: Api = make_api()
    created = await api.http.post("/api/v1/sessions", json={"config": {"idle_timeout_s": 2}})
    sid = created.json()["session_id"]
    assert (await _run(api, sid, "my name is Ada"))["status"] == "completed"
    async with connect(api.stream_url(sid), max_size=None) as ws:
        seen = await _events_until(ws, "turn_completed")
        paused = await _until_status(api, sid, "paused", timeout_s=30)
        assert paused["paused_reason"] == "idle" and paused["idle_timeout_s"] == 2
        deadline = time.monotonic() + 30
        while await asyncio.to_thread(_session_containers, docker_client, sid):
            assert time.monotonic() < deadline, "the paused session's container stayed"
            await asyncio.sleep(0.2)
        seen += await _events_until(ws, "exited")
        assert seen[-1]["data"]["reason"] == "stopped"
        started = time.monotonic()
        r = await api.http.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "recall"})
        assert r.status_code == 202, r.text
        seen += await collect_until(ws, turn_done(r.json()["message_id"]))
        resumed_turn_s = time.monotonic() - started
    _contiguous(seen)
    assert seen[-1]["data"]["result"] == "You first said: my name is Ada"
    ready = [e for e in seen if e["type"] == "ready"][-1]
    assert ready["data"]["resumed"] is True
    assert 0 < ready["data"]["resume_ms"] < resumed_turn_s * 1000
    metrics = (await api.http.get("/metrics")).text
    assert "ccgate_session_resume_seconds_count" in metrics
    assert 'ccgate_session_pauses_total{reason="idle"}' in metrics


async def test_pause_and_resume_on_request(
    make_api: Any, docker_client: docker.DockerClient
) -> None:
    api: Api = make_api()
    sid = (await api.http.post("/api/v1/sessions", json={})).json()["session_id"]
    assert (await _run(api, sid, "first words"))["status"] == "completed"
    r = await api.http.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "slow 5"})
    busy = await api.http.post(f"/api/v1/sessions/{sid}/pause")
    assert busy.status_code == 409 and "only an idle session" in busy.json()["detail"]
    await _run_wait(api, sid, r.json()["message_id"])
    paused = await api.http.post(f"/api/v1/sessions/{sid}/pause")
    assert paused.status_code == 200, paused.text
    assert paused.json()["status"] == "paused" and paused.json()["paused_reason"] == "requested"
    assert (await api.http.post(f"/api/v1/sessions/{sid}/pause")).json()["status"] == "paused"
    assert await asyncio.to_thread(_session_containers, docker_client, sid) == []
    interrupt = await api.http.post(f"/api/v1/sessions/{sid}/interrupt")
    assert interrupt.status_code == 409
    resumed = await api.http.post(f"/api/v1/sessions/{sid}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "starting"
    await _until_status(api, sid, "idle")
    assert (await _run(api, sid, "recall"))["result"] == "You first said: first words"
    stopped = await api.http.post(f"/api/v1/sessions/{sid}/stop")
    assert stopped.json()["status"] == "stopped"
    refused = await api.http.post(f"/api/v1/sessions/{sid}/resume")
    assert refused.status_code == 409


async def _run_wait(api: Api, sid: str, message_id: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        body = (await api.http.get(f"/api/v1/sessions/{sid}/messages/{message_id}")).json()
        if body["status"] not in ("queued", "running"):
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    await _until_status(api, sid, "idle")


async def test_a_stopped_paused_session_leaves_nothing_running(
    make_api: Any, docker_client: docker.DockerClient
) -> None:
    api: Api = make_api()
    sid = (await api.http.post("/api/v1/sessions", json={})).json()["session_id"]
    await _until_status(api, sid, "idle")
    assert (await api.http.post(f"/api/v1/sessions/{sid}/pause")).status_code == 200
    r = await api.http.post(f"/api/v1/sessions/{sid}/stop")
    assert r.json()["status"] == "stopped", r.text
    assert await asyncio.to_thread(_session_containers, docker_client, sid) == []
    chat = await api.http.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "hi"})
    assert chat.status_code == 409
    assert json.loads(chat.text)["detail"].startswith(f"session {sid} is stopped")
