"""Turn behaviour with the real CLI: queueing, interrupt, API errors, long lines, CLI restart."""

from __future__ import annotations

import asyncio
from typing import Any

import docker
import pytest
from websockets.asyncio.client import connect

from tests.conftest import Api
from tests.e2e.helpers import collect_until, final_message, turn_done

pytestmark = pytest.mark.e2e


async def _create(api: Api, **config: Any) -> str:
    r = await api.http.post("/api/v1/sessions", json={"config": config})
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


async def _chat(api: Api, sid: str, prompt: str, **extra: Any) -> str:
    r = await api.http.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": prompt, **extra})
    assert r.status_code == 202, r.text
    return str(r.json()["message_id"])


async def test_prompts_sent_while_starting_queue_in_order_and_never_mix(make_api: Any) -> None:
    api: Api = make_api()
    sid = await _create(api)
    # Both sent before the CLI is ready: queued, not refused.
    first = await _chat(api, sid, "bash echo one")
    second = await _chat(api, sid, "echo two")
    async with connect(api.stream_url(sid), max_size=None) as ws:
        events = await collect_until(ws, turn_done(second))
    started = [e["turn_id"] for e in events if e["type"] == "turn_started"]
    assert started == [first, second]
    # Every event between a turn's start and completion carries that turn's id.
    current = None
    for event in events:
        if event["type"] == "turn_started":
            current = event["turn_id"]
        if current is not None and event["type"] not in ("ready",):
            assert event["turn_id"] == current, event["type"]
        if event["type"] == "turn_completed":
            current = None
    results = {e["turn_id"]: e["data"]["result"] for e in events if e["type"] == "result"}
    assert results[first] == "Output: one"
    assert results[second] == "Echo: echo two"


async def test_interrupt_stops_a_slow_turn_and_the_session_goes_on(make_api: Any) -> None:
    api: Api = make_api()
    sid = await _create(api, include_partial_messages=True)
    async with connect(api.stream_url(sid), max_size=None) as ws:
        slow = await _chat(api, sid, "slow 30")
        # Wait until the model is visibly streaming, then interrupt.
        await collect_until(ws, lambda e: e["type"] == "stream_event" and e["turn_id"] == slow)
        r = await api.http.post(f"/api/v1/sessions/{sid}/interrupt")
        assert r.status_code == 202
        events = await collect_until(ws, turn_done(slow), timeout_s=25)
        completed = events[-1]["data"]
        assert completed["subtype"] == "error_during_execution"
        assert completed["terminal_reason"].startswith("aborted")
        after = await _chat(api, sid, "echo still here")
        more = await collect_until(ws, turn_done(after))
    assert (
        next(e for e in more if e["type"] == "result")["data"]["result"] == "Echo: echo still here"
    )
    message = await final_message(api.http, sid, slow)
    assert message["status"] == "interrupted"


@pytest.mark.parametrize("status", [400, 500, 529])
async def test_model_api_errors_fail_the_turn_not_the_session(make_api: Any, status: int) -> None:
    api: Api = make_api()
    # One retry keeps the CLI's backoff short for 500 and 529 (it retries those, not a 400).
    sid = await _create(api, env={"CLAUDE_CODE_MAX_RETRIES": "1"})
    r = await api.http.post(
        f"/api/v1/sessions/{sid}/chat", json={"prompt": f"fail {status}", "stream": False}
    )
    assert r.status_code == 200, r.text
    failed = r.json()
    assert failed["is_error"] is True and failed["status"] == "failed"
    assert "API Error" in (failed["result"] or "")
    r = await api.http.post(
        f"/api/v1/sessions/{sid}/chat", json={"prompt": "echo fine", "stream": False}
    )
    assert r.json()["result"] == "Echo: echo fine"
    assert (await api.http.get(f"/api/v1/sessions/{sid}")).json()["status"] == "idle"


async def test_a_stream_json_line_over_one_mebibyte_arrives_intact(make_api: Any) -> None:
    api: Api = make_api()
    sid = await _create(api)
    async with connect(api.stream_url(sid), max_size=None) as ws:
        mid = await _chat(api, sid, "big 1500000")
        events = await collect_until(ws, turn_done(mid))
    result = next(e for e in events if e["type"] == "result")["data"]["result"]
    assert len(result) == 1_500_000
    assert result.startswith("0123456789abcdef")


async def test_a_dead_cli_is_restarted_with_resume_and_remembers(
    make_api: Any, docker_client: docker.DockerClient
) -> None:
    api: Api = make_api()
    sid = await _create(api)
    r = await api.http.post(
        f"/api/v1/sessions/{sid}/chat", json={"prompt": "echo remember me", "stream": False}
    )
    assert r.status_code == 200
    container_id = (await api.http.get(f"/api/v1/sessions/{sid}")).json()["container_id"]
    async with connect(api.stream_url(sid), max_size=None) as ws:
        exit_code, _ = await asyncio.to_thread(
            docker_client.containers.get(container_id).exec_run, ["pkill", "-KILL", "-x", "claude"]
        )
        assert exit_code == 0
        events = await collect_until(ws, lambda e: e["type"] == "cli_restarted")
    restarted = events[-1]["data"]
    assert restarted["resumed"] is True
    r = await api.http.post(
        f"/api/v1/sessions/{sid}/chat", json={"prompt": "recall", "stream": False}
    )
    assert r.json()["result"] == "You first said: echo remember me"


async def test_stop_during_a_turn_ends_it_and_emits_exited(make_api: Any) -> None:
    api: Api = make_api()
    sid = await _create(api, include_partial_messages=True)
    async with connect(api.stream_url(sid), max_size=None) as ws:
        slow = await _chat(api, sid, "slow 60")
        queued = await _chat(api, sid, "echo never runs")
        await collect_until(ws, lambda e: e["type"] == "stream_event" and e["turn_id"] == slow)
        r = await api.http.post(f"/api/v1/sessions/{sid}/stop")
        assert r.status_code == 200 and r.json()["status"] == "stopped"
        events = await collect_until(ws, lambda e: e["type"] == "exited", timeout_s=30)
    types = [e["type"] for e in events]
    assert "turn_completed" in types and types[-1] == "exited"
    assert events[-1]["data"]["reason"] == "stopped"
    # Deterministic, whatever the timing: the running turn is interrupted, the queued one
    # never ran; both are final when stop returns.
    message = (await api.http.get(f"/api/v1/sessions/{sid}/messages/{slow}")).json()
    assert message["status"] == "interrupted", message
    never = (await api.http.get(f"/api/v1/sessions/{sid}/messages/{queued}")).json()
    assert never["status"] == "cancelled", never
