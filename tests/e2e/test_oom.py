"""Out of memory inside a session: reported as such (real Docker, the real CLI)."""

from __future__ import annotations

from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.conftest import Api
from tests.e2e.helpers import collect_until, turn_done

pytestmark = pytest.mark.e2e

# 1.5 GiB of bytes actually written, in a container limited to 1 GiB (swap = memory).
HOG = "bash python3 -c \"b = b'x' * (1536 * 2**20); print(len(b))\""


async def test_a_tool_that_allocates_past_the_limit_is_reported_as_oom(make_api: Any) -> None:
    api: Api = make_api()
    sid = (await api.http.post("/api/v1/sessions", json={})).json()["session_id"]
    async with connect(api.stream_url(sid), max_size=None) as ws:
        await collect_until(ws, lambda e: e["type"] == "ready")
        r = await api.http.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": HOG})
        message_id = r.json()["message_id"]
        events = await collect_until(ws, turn_done(message_id), timeout_s=120)
    oom = [e for e in events if e["type"] == "container_oom"]
    assert oom, [(e["type"], e["data"]) for e in events if e["type"] in ("error", "user")]
    assert oom[0]["source"] == "gateway" and "out of memory" in oom[0]["data"]["message"]
    assert oom[0]["turn_id"] == message_id
    # The kernel killed the tool, not the session: the turn ends and the session goes on.
    assert events[-1]["data"]["outcome"] == "completed"
    metrics = (await api.http.get("/metrics")).text
    assert "ccgate_container_ooms_total" in metrics
    again = await api.http.post(
        f"/api/v1/sessions/{sid}/chat", json={"prompt": "after", "stream": False}
    )
    assert again.json()["result"] == "Echo: after"
