"""Recursive child sessions with the real CLI: MCP spawn, limits, scoped tokens, cascade."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import redis as redis_lib
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.auth import decode_token, mint_token
from scripted_model import ScriptedModelServer
from tests.conftest import Api, full_stack_settings
from tests.containers import PostgresContainer, RedisContainer, S3Container
from tests.e2e.helpers import collect_until, turn_done
from tests.servers import GatewayServer
from wrapper.protocol import token_key

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def spawn_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
    s3_server: S3Container,
    scripted_model: ScriptedModelServer,
    docker_client: docker.DockerClient,
) -> Iterator[GatewayServer]:
    """A gateway with low spawn limits (depth 2, 5 live children per session)."""
    settings = full_stack_settings(
        Path(tmp_path_factory.mktemp("gw-spawn")),
        redis_server,
        postgres_server,
        s3_server,
        scripted_model,
        max_spawn_depth=2,
        max_children_per_session=5,
        max_live_sessions_per_tree=12,
        max_sessions_per_tree=30,
    )
    gateway = GatewayServer(settings).start()
    yield gateway
    gateway.stop()


@pytest.fixture
async def users(spawn_gateway: GatewayServer) -> AsyncIterator[list[Api]]:
    """Two users of the spawn gateway; their sessions are deleted afterwards."""
    made = [Api(spawn_gateway, f"test-{uuid.uuid4().hex[:8]}") for _ in range(2)]
    yield made
    for api in made:
        listing = (await api.http.get("/api/v1/sessions", params={"limit": 500})).json()
        for session in listing["sessions"]:
            if session["parent_session_id"] is None:
                await api.http.delete(f"/api/v1/sessions/{session['session_id']}")
        await api.http.aclose()


async def _root(api: Api, **config: Any) -> str:
    r = await api.http.post("/api/v1/sessions", json={"config": config})
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


async def _run(api: Api, sid: str, prompt: str) -> dict[str, Any]:
    r = await api.http.post(
        f"/api/v1/sessions/{sid}/chat", json={"prompt": prompt, "stream": False}
    )
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


async def _spawn(api: Api, parent: str, prompt: str, **extra: Any) -> str:
    r = await api.http.post(f"/api/v1/sessions/{parent}/spawn", json={"prompt": prompt, **extra})
    assert r.status_code == 201, r.text
    return str(r.json()["child_session_id"])


def _containers(client: docker.DockerClient, owner: str) -> list[Any]:
    return list(client.containers.list(all=True, filters={"label": f"ccgate.owner={owner}"}))


async def test_a_claude_spawns_a_child_through_mcp_and_waits_for_its_result(
    users: list[Api], scripted_model: ScriptedModelServer
) -> None:
    api = users[0]
    root = await _root(api)
    async with connect(api.stream_url(root), max_size=None) as ws:
        r = await api.http.post(
            f"/api/v1/sessions/{root}/chat", json={"prompt": "spawn echo from the child"}
        )
        mid = r.json()["message_id"]
        events = await collect_until(ws, turn_done(mid), timeout_s=120)
    result = next(e for e in events if e["type"] == "result")["data"]["result"]
    assert result == "Child said: Echo: echo from the child"
    kinds = [e["type"] for e in events]
    assert kinds.index("child_spawned") < kinds.index("child_result")
    spawned = next(e for e in events if e["type"] == "child_spawned")
    child_result = next(e for e in events if e["type"] == "child_result")
    assert spawned["source"] == "gateway"
    child = spawned["data"]["child_session_id"]
    assert child_result["data"]["child_session_id"] == child
    assert child_result["data"]["result"] == "Echo: echo from the child"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))

    children = (await api.http.get(f"/api/v1/sessions/{root}/children")).json()["children"]
    assert [c["session_id"] for c in children] == [child]
    assert children[0]["depth"] == 1 and children[0]["parent_session_id"] == root
    assert children[0]["total_turns"] == 1  # the spawn prompt ran exactly once
    ran = [
        body
        for body in scripted_model.requests
        if body.get("tools")
        and any(
            isinstance(m.get("content"), list)
            and any(b.get("text") == "echo from the child" for b in m["content"])
            for m in body.get("messages", [])
        )
    ]
    assert len(ran) == 1

    # The tree's cost is the sum of its nodes' costs, each the latest total from its results.
    waited = await api.http.post(f"/api/v1/sessions/{root}/wait", json={"timeout_seconds": 30})
    assert waited.json()["message_id"] == mid and waited.json()["status"] == "completed"
    tree = (await api.http.get(f"/api/v1/sessions/{root}/tree")).json()
    nodes = [tree["tree"], *tree["tree"]["children"]]
    latest = {}
    for node in nodes:
        async with connect(api.stream_url(node["session_id"]), max_size=None) as ws:
            seen = await collect_until(ws, lambda e: e["type"] == "turn_completed")
        latest[node["session_id"]] = [e for e in seen if e["type"] == "result"][-1]["data"][
            "total_cost_usd"
        ]
    for node in nodes:
        assert node["total_cost_usd"] == pytest.approx(latest[node["session_id"]])
    assert tree["totals"]["total_cost_usd"] == pytest.approx(sum(latest.values()))
    assert tree["totals"]["sessions"] == 2
    assert tree["tree_counters"]["spend_usd"] == pytest.approx(sum(latest.values()))


async def test_a_spawn_chain_stops_at_max_depth_with_a_tool_error(
    users: list[Api], docker_client: docker.DockerClient
) -> None:
    api = users[0]
    root = await _root(api)
    result = await _run(api, root, "spawn spawn spawn echo bottom")
    assert result["result"].startswith("Child said: Child said: Spawn failed:")
    assert "max_spawn_depth is 2" in result["result"]
    tree = (await api.http.get(f"/api/v1/sessions/{root}/tree")).json()
    assert tree["totals"]["sessions"] == 3  # root, child, grandchild; nothing at depth 3
    grandchild = tree["tree"]["children"][0]["children"][0]
    assert grandchild["depth"] == 2 and grandchild["children"] == []
    assert len(_containers(docker_client, api.user)) == 3


async def test_twenty_concurrent_spawns_against_five_children_admit_exactly_five(
    users: list[Api], docker_client: docker.DockerClient
) -> None:
    api = users[0]
    root = await _root(api)
    answers = await asyncio.gather(
        *(
            api.http.post(f"/api/v1/sessions/{root}/spawn", json={"prompt": f"echo {n}"})
            for n in range(20)
        )
    )
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] * 5 + [409] * 15
    refusal = next(r.json() for r in answers if r.status_code == 409)
    assert refusal["code"] == "spawn_refused"
    assert "max_children_per_session is 5" in refusal["detail"]
    assert len(_containers(docker_client, api.user)) == 6
    children = (await api.http.get(f"/api/v1/sessions/{root}/children")).json()["children"]
    assert len(children) == 5
    # POST /sessions with a parent is held to the same limits.
    r = await api.http.post("/api/v1/sessions", json={"parent_session_id": root})
    assert r.status_code == 409 and "max_children_per_session is 5" in r.json()["detail"]
    # Only live children count: stopping one makes room for exactly one more.
    await api.http.post(f"/api/v1/sessions/{children[0]['session_id']}/stop")
    await _spawn(api, root, "echo again")
    r = await api.http.post(f"/api/v1/sessions/{root}/spawn", json={"prompt": "echo more"})
    assert r.status_code == 409


async def test_a_session_token_reaches_only_its_own_subtree(users: list[Api]) -> None:
    alice, bob = users
    root = await _root(alice)
    a = await _spawn(alice, root, "echo a")
    b = await _spawn(alice, root, "echo b")
    a1 = await _spawn(alice, a, "echo a1")
    foreign = await _root(bob)
    token = mint_token(key=alice.gateway.app.state.jwt_key, user=alice.user, ttl_s=300,
                       session_scope=a)  # fmt: skip
    headers = {"Authorization": f"Bearer {token}"}
    http = alice.http

    assert (await http.get(f"/api/v1/sessions/{a1}", headers=headers)).status_code == 200
    assert (await http.get(f"/api/v1/sessions/{a}/children", headers=headers)).status_code == 200
    for path in (
        f"/api/v1/sessions/{b}",
        f"/api/v1/sessions/{root}",
        f"/api/v1/sessions/{foreign}",
    ):
        assert (await http.get(path, headers=headers)).status_code == 404, path
    for path in (f"/api/v1/sessions/{b}/stop", f"/api/v1/sessions/{foreign}/stop"):
        assert (await http.post(path, headers=headers)).status_code == 404, path
    r = await http.post(f"/api/v1/sessions/{b}/spawn", json={"prompt": "x"}, headers=headers)
    assert r.status_code == 404
    r = await http.post(f"/api/v1/sessions/{a1}/spawn", json={"prompt": "x"}, headers=headers)
    assert r.status_code == 403
    assert (await http.get("/api/v1/sessions", headers=headers)).status_code == 403
    assert (await http.delete(f"/api/v1/sessions/{a1}", headers=headers)).status_code == 403
    assert (await http.post("/api/v1/sessions", json={}, headers=headers)).status_code == 403
    url = f"{alice.gateway.ws_url}/api/v1/sessions/{b}/stream?token={token}"
    async with connect(url) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404
    # What it may do, it can: stop its descendant.
    r = await http.post(f"/api/v1/sessions/{a1}/stop", headers=headers)
    assert r.status_code == 200 and r.json()["status"] == "stopped"


async def test_inherit_shares_and_clone_copies_the_parent_workspace(users: list[Api]) -> None:
    api = users[0]
    root = await _root(api)
    await _run(api, root, "write shared.txt from the parent")
    inherit = await _spawn(
        api, root, "bash cat /workspace/shared.txt && touch /workspace/by-inherit.txt",
        workspace={"type": "inherit"},
    )  # fmt: skip
    clone = await _spawn(
        api, root, "bash cat /workspace/shared.txt && touch /workspace/by-clone.txt",
        workspace={"type": "clone"},
    )  # fmt: skip
    for child in (inherit, clone):
        r = await api.http.post(f"/api/v1/sessions/{child}/wait", json={"timeout_seconds": 60})
        assert r.json()["result"] == "Output: from the parent"
    listing = await _run(api, root, "bash ls /workspace")
    assert "by-inherit.txt" in listing["result"]
    assert "by-clone.txt" not in listing["result"]


async def test_the_tree_budget_refuses_spawns_once_spent(users: list[Api]) -> None:
    api = users[0]
    root = await _root(api, max_budget_usd=0.02)
    await _run(api, root, "write spent.txt two model calls")  # about $0.017
    child = await _spawn(api, root, "echo spend the rest")
    config = (await api.http.get(f"/api/v1/sessions/{child}")).json()["config"]
    assert config["max_budget_usd"] is None  # the tree's budget is enforced at the proxy
    r = await api.http.post(f"/api/v1/sessions/{child}/wait", json={"timeout_seconds": 60})
    assert r.status_code == 200
    tree = (await api.http.get(f"/api/v1/sessions/{root}/tree")).json()
    assert tree["tree_counters"]["spend_usd"] > 0.02
    r = await api.http.post(f"/api/v1/sessions/{root}/spawn", json={"prompt": "echo one more"})
    assert r.status_code == 409 and "cost budget" in r.json()["detail"]


async def test_stop_and_delete_cascade_over_a_three_level_tree(
    users: list[Api], docker_client: docker.DockerClient
) -> None:
    api = users[0]
    root = await _root(api)
    child = await _spawn(api, root, "echo child")
    grandchild = await _spawn(api, child, "echo grandchild")
    assert len(_containers(docker_client, api.user)) == 3

    r = await api.http.post(f"/api/v1/sessions/{root}/stop")
    assert r.status_code == 200
    for sid in (root, child, grandchild):
        assert (await api.http.get(f"/api/v1/sessions/{sid}")).json()["status"] == "stopped"
    assert _containers(docker_client, api.user) == []

    assert (await api.http.delete(f"/api/v1/sessions/{root}")).status_code == 204
    for sid in (root, child, grandchild):
        assert (await api.http.get(f"/api/v1/sessions/{sid}")).status_code == 404
    volumes = docker_client.volumes.list(filters={"label": f"ccgate.owner={api.user}"})
    assert volumes == []


async def test_deleting_a_child_detaches_it_and_tells_the_parent(users: list[Api]) -> None:
    api = users[0]
    root = await _root(api)
    async with connect(api.stream_url(root), max_size=None) as ws:
        child = await _spawn(api, root, "echo soon gone")
        assert (await api.http.delete(f"/api/v1/sessions/{child}")).status_code == 204
        events = await collect_until(ws, lambda e: e["type"] == "child_stopped")
    assert events[-1]["data"]["child_session_id"] == child
    session = (await api.http.get(f"/api/v1/sessions/{root}")).json()
    assert session["child_session_ids"] == []
    assert session["status"] in ("starting", "idle")


async def test_a_spawn_callback_receives_the_childs_result(users: list[Api]) -> None:
    received: list[dict[str, Any]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        api = users[0]
        root = await _root(api)
        hook = f"http://127.0.0.1:{server.server_address[1]}/done"
        child = await _spawn(api, root, "echo call me back", callback=hook)
        for _ in range(120):
            if received:
                break
            await asyncio.sleep(0.25)
        assert received, "the callback was never called"
        assert received[0]["event"] == "child_result"
        assert received[0]["child_session_id"] == child
        assert received[0]["result"] == "Echo: echo call me back"
    finally:
        server.shutdown()


async def test_session_tokens_are_renewed_before_they_expire(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
    s3_server: S3Container,
    scripted_model: ScriptedModelServer,
) -> None:
    tmp = Path(tmp_path_factory.mktemp("gw-tokens"))
    settings = full_stack_settings(
        tmp,
        redis_server,
        postgres_server,
        s3_server,
        scripted_model,
        session_token_ttl_s=6,
        # Its own (SQLite) database: other test gateways must not know, and renew, this session.
        database_url=f"sqlite+aiosqlite:///{tmp}/tokens.db",
    )
    gateway = GatewayServer(settings).start()
    api = Api(gateway, f"test-{uuid.uuid4().hex[:8]}")
    client = redis_lib.Redis.from_url(redis_server.url)
    try:
        sid = await _root(api)
        first = client.get(token_key(sid))
        assert first is not None and 0 < client.ttl(token_key(sid)) <= 6
        for _ in range(40):
            await asyncio.sleep(0.25)
            current = client.get(token_key(sid))
            if current not in (None, first):
                break
        assert current not in (None, first), "the token was not renewed"
        scoped = decode_token(current.decode(), key=gateway.app.state.jwt_key)
        assert scoped.session_scope == sid and scoped.user == api.user
    finally:
        client.close()
        await api.http.delete(f"/api/v1/sessions/{sid}")
        await api.http.aclose()
        gateway.stop()


async def test_a_callback_to_a_private_address_is_refused_before_anything_is_created(
    make_api: Any,
) -> None:
    """SSRF: only the networks the operator allowed (here 127.0.0.0/8, where the tests'
    receivers listen) are reachable; nothing is created for a refused callback."""
    api: Api = make_api()
    root = (await api.http.post("/api/v1/sessions", json={})).json()["session_id"]
    for target in (
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.1/x",
        "http://192.168.1.1:8080/x",
        "http://[::1]:8000/x",
    ):
        r = await api.http.post(
            f"/api/v1/sessions/{root}/spawn", json={"prompt": "echo hi", "callback": target}
        )
        assert r.status_code == 422, r.text
        assert r.json()["code"] == "callback_refused"
    children = (await api.http.get(f"/api/v1/sessions/{root}/children")).json()["children"]
    assert children == []
    tree = (await api.http.get(f"/api/v1/sessions/{root}/tree")).json()
    assert tree["tree_counters"]["sessions_created"] == 1
