"""Every route that names a session, the WebSocket and the SSE stream, called by someone who
must not reach it: another user, and a container's session token of another tree. The answer
is 404 (or 403 where a session token is refused outright), never data.

The routes are read from the app's OpenAPI document, so a new route is covered (or fails this
test for want of a request body below) without editing a list of paths.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.auth import mint_token
from tests.conftest import JWT_SECRET, Api

pytestmark = pytest.mark.e2e

BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/api/v1/sessions/{session_id}/chat"): {"prompt": "leak?", "stream": False},
    ("POST", "/api/v1/sessions/{session_id}/spawn"): {"prompt": "leak?"},
    ("POST", "/api/v1/sessions/{session_id}/wait"): {"timeout_seconds": 1},
}


def _session_routes(app: Any) -> list[tuple[str, str]]:
    """(method, path) of every operation in the app's OpenAPI document that names a session."""
    routes = []
    for path, operations in app.openapi()["paths"].items():
        if "{session_id}" in path:
            routes += [(method.upper(), path) for method in sorted(operations)]
    return routes


def _url(path: str, sid: str, message_id: str) -> str:
    return (
        path.replace("{session_id}", sid)
        .replace("{message_id}", message_id)
        .replace("{path}", "secret.txt")
        .replace("{path:path}", "secret.txt")
    )


async def test_no_route_gives_another_user_or_another_tree_anything(make_api: Any) -> None:
    alice: Api = make_api()
    mallory: Api = make_api()
    r = await alice.http.post("/api/v1/sessions", json={})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    done = await alice.http.post(
        f"/api/v1/sessions/{sid}/chat",
        json={"prompt": "write secret.txt the secret", "stream": False},
    )
    assert done.json()["status"] == "completed", done.text
    message_id = done.json()["message_id"]
    other_root = (await alice.http.post("/api/v1/sessions", json={})).json()["session_id"]
    # What a container of alice's *other* tree holds: a session token scoped to that tree.
    other_tree = mint_token(key=JWT_SECRET, user=alice.user, ttl_s=600, session_scope=other_root)

    callers = {
        "another user": {"Authorization": f"Bearer {mallory.token}"},
        "another tree's container": {"Authorization": f"Bearer {other_tree}"},
    }
    routes = _session_routes(alice.gateway.app)
    assert len(routes) >= 15, routes
    async with httpx.AsyncClient(base_url=alice.gateway.url, timeout=30) as http:
        for who, headers in callers.items():
            for method, path in routes:
                url = _url(path, sid, message_id)
                body = BODIES.get((method, path))
                r = await http.request(method, url, headers=headers, json=body)
                allowed = {404} if who == "another user" else {403, 404}
                assert r.status_code in allowed, (who, method, path, r.status_code, r.text)
                assert r.json()["code"] in ("not_found", "forbidden"), (who, path, r.text)
                assert "the secret" not in r.text
            listing = await http.get("/api/v1/sessions", headers=headers)
            assert sid not in listing.text
            for params in ({"user": alice.user}, {}):
                usage = await http.get("/api/v1/usage", params=params, headers=headers)
                if who == "another user" and not params:
                    assert usage.status_code == 200 and alice.user not in usage.text
                else:
                    assert usage.status_code == 403, (who, params, usage.text)
            sse = await http.get(f"/api/v1/sessions/{sid}/events/stream", headers=headers)
            assert sse.status_code == 404

    for who, token in (("another user", mallory.token), ("another tree's container", other_tree)):
        url = f"{alice.gateway.ws_url}/api/v1/sessions/{sid}/stream?token={token}"
        async with connect(url) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    message = json.loads(await ws.recv())
                    assert "seq" not in message, (who, message)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404, who

    # The owner still sees everything (the matrix above is not refusing everyone).
    assert (await alice.http.get(f"/api/v1/sessions/{sid}/artifacts/secret.txt")).status_code == 200
