"""A whole session with the real CLI in the real image: stream, turns, memory, artifacts."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import docker
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.services.runtime.base import WRAPPER_CAPS
from tests.conftest import Api
from tests.e2e.helpers import collect_until, turn_done

pytestmark = pytest.mark.e2e


async def test_session_streams_two_turns_keeps_memory_collects_artifacts_and_cleans_up(
    make_api: Any, docker_client: docker.DockerClient
) -> None:
    alice: Api = make_api()
    mallory: Api = make_api()

    r = await alice.http.post("/api/v1/sessions", json={"config": {"model": "claude-sonnet-4-5"}})
    assert r.status_code == 201, r.text
    created = r.json()
    sid = created["session_id"]
    assert created["status"] == "starting"
    assert created["websocket_url"].endswith(f"/api/v1/sessions/{sid}/stream")

    container = docker_client.containers.get(created["container_id"])
    host = container.attrs["HostConfig"]
    assert container.labels["ccgate.session_id"] == sid
    assert container.labels["ccgate.owner"] == alice.user
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    # The wrapper is root with four capabilities; the CLI and the agent's tools are uid 1000
    # with none (tests/e2e/test_trust_boundary.py checks from inside).
    assert container.attrs["Config"]["User"] == "0:0"
    assert sorted(host["CapAdd"]) == sorted(WRAPPER_CAPS)
    assert host["Memory"] == 1024**3 and host["PidsLimit"] == 512
    assert not any("docker.sock" in m.get("Source", "") for m in container.attrs["Mounts"])

    async with connect(alice.stream_url(sid), max_size=None) as ws:
        r = await alice.http.post(
            f"/api/v1/sessions/{sid}/chat", json={"prompt": "write report/out.txt artifact body"}
        )
        assert r.status_code == 202, r.text
        first_id = r.json()["message_id"]
        events = await collect_until(ws, turn_done(first_id))

        seqs = [e["seq"] for e in events]
        assert seqs == list(range(1, len(seqs) + 1)), "events must arrive in seq order, no gap"
        types = [e["type"] for e in events]
        for expected in ("ready", "turn_started", "system", "assistant", "user", "result"):
            assert expected in types
        assert types.index("ready") < types.index("turn_started") < types.index("result")
        result = next(e for e in events if e["type"] == "result")
        assert result["turn_id"] == first_id and result["source"] == "cli"
        assert result["data"]["subtype"] == "success"
        assert result["data"]["total_cost_usd"] > 0
        cli_session_id = result["data"]["session_id"]
        completed = events[-1]["data"]
        assert completed["files"][0]["path"] == "report/out.txt"

        r = await alice.http.post(
            f"/api/v1/sessions/{sid}/chat", json={"prompt": "recall", "stream": False}
        )
        assert r.status_code == 200, r.text
        second = r.json()
        assert second["result"] == "You first said: write report/out.txt artifact body"
        assert second["status"] == "completed" and second["is_error"] is False
        assert second["total_cost_usd"] > result["data"]["total_cost_usd"]
        assert second["cost_usd"] == pytest.approx(
            second["total_cost_usd"] - result["data"]["total_cost_usd"]
        )

        more = await collect_until(ws, turn_done(second["message_id"]))
        assert [e["seq"] for e in more] == list(range(seqs[-1] + 1, seqs[-1] + 1 + len(more)))
        second_result = next(e for e in more if e["type"] == "result")
        assert second_result["data"]["session_id"] == cli_session_id

    session = (await alice.http.get(f"/api/v1/sessions/{sid}")).json()
    assert session["status"] == "idle"
    assert session["total_turns"] == 2
    assert session["total_cost_usd"] == pytest.approx(second["total_cost_usd"])
    assert session["usage"]["input_tokens"] > 0
    assert session["cli_session_id"] == cli_session_id

    message = (await alice.http.get(f"/api/v1/sessions/{sid}/messages/{first_id}")).json()
    assert message["status"] == "completed"
    assert message["result"] == "Wrote report/out.txt."
    assert message["prompt"] == "write report/out.txt artifact body"

    listing = (await alice.http.get(f"/api/v1/sessions/{sid}/artifacts")).json()["artifacts"]
    assert [a["path"] for a in listing] == ["report/out.txt"]
    download = await alice.http.get(f"/api/v1/sessions/{sid}/artifacts/report/out.txt")
    assert download.status_code == 200
    assert download.content == b"artifact body\n"
    assert hashlib.sha256(download.content).hexdigest() == listing[0]["sha256"]

    # A reconnecting client replays exactly what follows its last seq.
    last_seen = seqs[-1] - 3
    async with connect(alice.stream_url(sid, after_seq=last_seen), max_size=None) as ws:
        replay = await collect_until(ws, turn_done(second["message_id"]))
    assert replay[0]["seq"] == last_seen + 1
    assert [e["seq"] for e in replay] == list(range(last_seen + 1, last_seen + 1 + len(replay)))

    # Another user sees none of it.
    for method, path, body in [
        ("GET", f"/api/v1/sessions/{sid}", None),
        ("POST", f"/api/v1/sessions/{sid}/chat", {"prompt": "hi"}),
        ("GET", f"/api/v1/sessions/{sid}/messages/{first_id}", None),
        ("GET", f"/api/v1/sessions/{sid}/artifacts", None),
        ("GET", f"/api/v1/sessions/{sid}/artifacts/report/out.txt", None),
        ("POST", f"/api/v1/sessions/{sid}/interrupt", None),
        ("POST", f"/api/v1/sessions/{sid}/stop", None),
        ("DELETE", f"/api/v1/sessions/{sid}", None),
    ]:
        r = await mallory.http.request(method, path, json=body)
        assert r.status_code == 404, (method, path, r.status_code)
    assert (await mallory.http.get("/api/v1/sessions")).json()["total"] == 0
    async with connect(mallory.stream_url(sid), max_size=None) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404

    # Stop: the container is gone for real, volumes stay; chat is refused.
    r = await alice.http.post(f"/api/v1/sessions/{sid}/stop")
    assert r.status_code == 200 and r.json()["status"] == "stopped"
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(created["container_id"])
    volumes = {
        v.name for v in docker_client.volumes.list(filters={"label": f"ccgate.session_id={sid}"})
    }
    assert volumes == {f"ccgate-ws-{sid}", f"ccgate-cfg-{sid}"}
    r = await alice.http.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "again"})
    assert r.status_code == 409
    assert "stopped" in r.json()["detail"]

    # Delete: nothing is left.
    r = await alice.http.delete(f"/api/v1/sessions/{sid}")
    assert r.status_code == 204
    assert docker_client.volumes.list(filters={"label": f"ccgate.session_id={sid}"}) == []
    assert (
        docker_client.containers.list(all=True, filters={"label": f"ccgate.session_id={sid}"}) == []
    )
    assert (await alice.http.get(f"/api/v1/sessions/{sid}")).status_code == 404
    assert (
        await alice.http.get(f"/api/v1/sessions/{sid}/artifacts/report/out.txt")
    ).status_code == 404


async def test_websocket_accepts_prompts_pings_and_the_bearer_subprotocol(make_api: Any) -> None:
    alice: Api = make_api()
    sid = (await alice.http.post("/api/v1/sessions", json={})).json()["session_id"]
    url = f"{alice.gateway.ws_url}/api/v1/sessions/{sid}/stream"
    async with connect(url, subprotocols=["bearer", alice.token], max_size=None) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "bearer"
        await ws.send(json.dumps({"type": "ping"}))
        await ws.send(json.dumps({"type": "prompt", "prompt": "braces"}))
        replies: list[dict[str, Any]] = []
        ack: dict[str, Any] = {}
        while not ack:
            msg = json.loads(await ws.recv())
            if "seq" not in msg:
                replies.append(msg)
                if msg["type"] == "ack":
                    ack = msg
        assert {"type": "pong"} in replies
        events = await collect_until(ws, turn_done(ack["message_id"]))
    result = next(e for e in events if e["type"] == "result")
    assert '{"key": "va}lue"' in result["data"]["result"]
    assert "日本語 🚀" in result["data"]["result"]


async def test_bad_tokens_are_refused_on_rest_and_websocket(make_api: Any) -> None:
    alice: Api = make_api()
    http = alice.http
    r = await http.get("/api/v1/sessions", headers={"Authorization": "Bearer nonsense"})
    assert r.status_code == 401 and "invalid token" in r.json()["detail"]
    r = await http.get("/api/v1/sessions", headers={"Authorization": ""})
    assert r.status_code == 401
    url = f"{alice.gateway.ws_url}/api/v1/sessions/whatever/stream?token=nonsense"
    async with connect(url) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
