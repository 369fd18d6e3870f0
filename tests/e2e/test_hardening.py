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


async def test_the_root_filesystem_is_read_only_outside_the_workspace_and_tmpfs(
    make_api: Any,
) -> None:
    api: Api = make_api()
    sid = (await api.http.post("/api/v1/sessions", json={})).json()["session_id"]
    places = [
        "/workspace",
        "/tmp",
        "/home/claude",
        "/home/claude/.claude",
        "/",
        "/etc",
        "/usr/local/bin",
        "/opt/ccgate/app",
        "/var/tmp",
        "/var/lib/ccgate",
        "/run/ccgate",
        "/home/claude/.claude/ccgate",
    ]
    probe = "; ".join(f"(touch {p}/probe 2>/dev/null && echo {p}=w) || echo {p}=ro" for p in places)
    r = await api.http.post(
        f"/api/v1/sessions/{sid}/chat", json={"prompt": f"bash {probe}", "stream": False}
    )
    assert r.status_code == 200, r.text
    result = dict(w.split("=") for w in (r.json()["result"] or "").removeprefix("Output:").split())
    writable = {p for p, mode in result.items() if mode == "w"}
    assert writable == {"/workspace", "/tmp", "/home/claude", "/home/claude/.claude"}, result
    # The session still works: the CLI's transcript and the wrapper's marker were written.
    again = await api.http.post(
        f"/api/v1/sessions/{sid}/chat", json={"prompt": "recall", "stream": False}
    )
    assert again.json()["result"].startswith("You first said: bash"), again.text
