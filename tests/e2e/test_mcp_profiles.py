"""MCP profiles attached to a session with the real CLI in a real container: the profile's
server (a stdio MCP server) is connected before ``ready``, its secret reaches that server's
environment, and the secret never appears in the session's API view."""

from __future__ import annotations

import json
from typing import Any

import docker
import pytest

from tests.conftest import Api
from tests.e2e.test_warm_pool import ready_event

pytestmark = pytest.mark.e2e

SECRET = "probe-secret-" + "x" * 20
# A minimal stdio MCP server: writes its secret where the test can read it, answers the
# lifecycle and an empty tool list.
PROBE = """
import json, os, sys
open("/tmp/probe-secret", "w").write(os.environ.get("PROBE_SECRET", ""))
for line in sys.stdin:
    m = json.loads(line)
    if "id" not in m:
        continue
    if m.get("method") == "initialize":
        r = {"protocolVersion": m["params"]["protocolVersion"], "capabilities": {"tools": {}},
             "serverInfo": {"name": "probe", "version": "1"}}
    elif m.get("method") == "tools/list":
        r = {"tools": []}
    else:
        r = {}
    print(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": r}), flush=True)
"""


async def test_a_sessions_mcp_profile_runs_in_its_container_with_its_secret(
    make_api: Any, docker_client: docker.DockerClient
) -> None:
    api: Api = make_api()
    profile = {
        "name": "probe",
        "servers": {
            "probe": {"command": "python3", "args": ["-c", PROBE], "env": {"PROBE_SECRET": SECRET}}
        },
    }
    assert (await api.http.post("/api/v1/mcp-profiles", json=profile)).status_code == 201
    r = await api.http.post("/api/v1/sessions", json={"config": {"mcp_profiles": ["probe"]}})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    ready = await ready_event(api, sid)
    assert ready["mcp_servers"]["probe"] == "connected", ready
    container = docker_client.containers.get(f"ccgate-{sid}")
    code, out = container.exec_run(["cat", "/tmp/probe-secret"], user="1000")
    assert code == 0 and out.decode() == SECRET
    shown = await api.http.get(f"/api/v1/sessions/{sid}")
    assert shown.json()["config"]["mcp_profiles"] == ["probe"]
    assert SECRET not in shown.text and "mcp_profile_servers" not in shown.text
    # Deleting the profile does not take the servers from a session that has them.
    assert (await api.http.delete("/api/v1/mcp-profiles/probe")).status_code == 204
    done = await api.http.post(f"/api/v1/sessions/{sid}/chat",
                               json={"prompt": "echo still", "stream": False})  # fmt: skip
    assert done.json()["status"] == "completed", done.text


async def test_an_unknown_profile_or_a_server_given_twice_is_refused_before_anything_starts(
    make_api: Any,
) -> None:
    api: Api = make_api()
    r = await api.http.post("/api/v1/sessions", json={"config": {"mcp_profiles": ["nope"]}})
    assert r.status_code == 422 and "no MCP profile named 'nope'" in r.text
    twice = {"name": "twice", "servers": {"dup": {"command": "true"}}}
    assert (await api.http.post("/api/v1/mcp-profiles", json=twice)).status_code == 201
    config = {"mcp_profiles": ["twice"], "mcp_servers": {"dup": {"command": "true"}}}
    r = await api.http.post("/api/v1/sessions", json={"config": config})
    assert r.status_code == 422 and "'dup' is defined twice" in r.text
    listing = (await api.http.get("/api/v1/sessions")).json()
    assert listing["total"] == 0, json.dumps(listing)[:300]
