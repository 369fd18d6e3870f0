"""Limits a session container runs with, seen from the agent's own shell."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Api

pytestmark = pytest.mark.e2e


async def test_the_agents_shell_runs_unprivileged_with_the_open_file_limit(make_api: Any) -> None:
    api: Api = make_api()
    sid = (await api.http.post("/api/v1/sessions", json={})).json()["session_id"]
    r = await api.http.post(
        f"/api/v1/sessions/{sid}/chat",
        json={
            "prompt": "bash ulimit -Sn; ulimit -Hn; id -u",
            "stream": False,
        },
    )
    assert r.status_code == 200, r.text
    output = (r.json()["result"] or "").removeprefix("Output:").split()
    assert output == ["4096", "4096", "1000"], r.json()["result"]
