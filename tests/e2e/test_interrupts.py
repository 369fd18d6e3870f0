"""Interrupts that always end the turn: honoured by the CLI, forced on a CLI that ignores them,
and on a container that is stuck altogether (real Docker, the real CLI, the scripted model)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import docker
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import Api
from tests.e2e.helpers import collect_until, final_message, turn_done

pytestmark = pytest.mark.e2e

_STREAMING = {"config": {"include_partial_messages": True}}


async def _slow_turn(api: Api, sid: str, ws: ClientConnection) -> tuple[str, list[Any]]:
    """Start ``slow 120`` and return once the model is streaming it."""
    r = await api.http.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "slow 120"})
    assert r.status_code == 202, r.text
    message_id = r.json()["message_id"]
    seen = await collect_until(
        ws, lambda e: e["type"] == "stream_event" and e["turn_id"] == message_id
    )
    return message_id, seen


async def _interrupt_and_wait(
    api: Api, sid: str, ws: ClientConnection, message_id: str
) -> tuple[float, list[Any]]:
    started = time.monotonic()
    assert (await api.http.post(f"/api/v1/sessions/{sid}/interrupt")).status_code == 202
    events = await collect_until(ws, turn_done(message_id), timeout_s=60)
    return time.monotonic() - started, events


async def _ready(api: Api, sid: str, ws: ClientConnection) -> dict[str, Any]:
    events = await collect_until(ws, lambda e: e["type"] == "ready")
    return dict(events[-1]["data"])


def _exec(client: docker.DockerClient, sid: str, *command: str) -> str:
    container = client.containers.get(f"ccgate-{sid}")
    code, out = container.exec_run(list(command), user="0")
    assert code == 0, out
    return str(out.decode())


async def _echo(api: Api, sid: str) -> dict[str, Any]:
    r = await api.http.post(
        f"/api/v1/sessions/{sid}/chat", json={"prompt": "still here", "stream": False}
    )
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


async def test_an_interrupt_ends_a_streaming_turn_within_the_grace_and_the_next_turn_works(
    make_api: Any,
) -> None:
    api: Api = make_api()
    sid = (await api.http.post("/api/v1/sessions", json=_STREAMING)).json()["session_id"]
    async with connect(api.stream_url(sid), max_size=None) as ws:
        await _ready(api, sid, ws)
        message_id, _ = await _slow_turn(api, sid, ws)
        took_s, events = await _interrupt_and_wait(api, sid, ws, message_id)
    grace = api.gateway.app.state.settings.interrupt_grace_s
    assert took_s < grace, f"the interrupt took {took_s:.1f}s"
    final = events[-1]["data"]
    assert final["outcome"] == "interrupted" and final["terminal_reason"] == "aborted_streaming"
    message = await final_message(api.http, sid, message_id)
    assert message["status"] == "interrupted" and message["outcome"] == "interrupted"
    assert (await _echo(api, sid))["result"] == "Echo: still here"


async def test_a_cli_that_ignores_the_interrupt_is_killed_and_the_turn_still_ends(
    make_api: Any, docker_client: docker.DockerClient
) -> None:
    api: Api = make_api()
    sid = (await api.http.post("/api/v1/sessions", json=_STREAMING)).json()["session_id"]
    async with connect(api.stream_url(sid), max_size=None) as ws:
        cli_pid = (await _ready(api, sid, ws))["cli_pid"]
        message_id, _ = await _slow_turn(api, sid, ws)
        # A CLI that no longer reads anything: stopped, so the interrupt goes unanswered.
        await asyncio.to_thread(_exec, docker_client, sid, "kill", "-STOP", str(cli_pid))
        took_s, events = await _interrupt_and_wait(api, sid, ws, message_id)
        restarted = await collect_until(ws, lambda e: e["type"] == "cli_restarted")
    grace = api.gateway.app.state.settings.interrupt_grace_s
    assert grace <= took_s < grace + 5, f"ended after {took_s:.1f}s"
    final = events[-1]
    assert final["source"] == "wrapper" and final["data"]["outcome"] == "killed"
    assert final["data"]["terminal_reason"] == "interrupt_ignored"
    assert any(e["type"] == "error" and e["data"]["code"] == "interrupt_ignored" for e in events)
    assert restarted[-1]["data"]["resumed"] is True
    message = await final_message(api.http, sid, message_id)
    assert message["status"] == "interrupted" and message["outcome"] == "killed"
    assert (await _echo(api, sid))["status"] == "completed"


async def test_a_stuck_container_is_killed_and_its_turn_ended_by_the_gateway(
    make_api: Any, docker_client: docker.DockerClient
) -> None:
    api: Api = make_api()
    sid = (await api.http.post("/api/v1/sessions", json=_STREAMING)).json()["session_id"]
    async with connect(api.stream_url(sid), max_size=None) as ws:
        await _ready(api, sid, ws)
        message_id, _ = await _slow_turn(api, sid, ws)
        # Freeze everything but init: neither the CLI nor the wrapper can act any more.
        freeze = (
            'for p in $(pgrep -f "m wrapper|claude"); do [ "$p" = "$$" ] || kill -STOP "$p"; done'
        )
        await asyncio.to_thread(_exec, docker_client, sid, "sh", "-c", freeze + "; true")
        took_s, events = await _interrupt_and_wait(api, sid, ws, message_id)
        exited = await collect_until(ws, lambda e: e["type"] == "exited")
    settings = api.gateway.app.state.settings
    limit = settings.interrupt_grace_s + 5 + settings.lifecycle_interval_s + 3
    assert took_s < limit, f"ended after {took_s:.1f}s"
    final = events[-1]
    assert final["source"] == "gateway" and final["data"]["outcome"] == "killed"
    assert exited[-1]["data"]["cause"] == "killed"
    message = await final_message(api.http, sid, message_id)
    assert message["status"] == "failed" and message["outcome"] == "killed"
    # The conversation goes on in a new container.
    assert (await _echo(api, sid))["status"] == "completed"
