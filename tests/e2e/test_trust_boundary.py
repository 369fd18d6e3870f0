"""The trust boundary seen from a real session container: the upstream key out of reach,
cost metered outside the sandbox, budgets enforced at the model proxy (with the real CLI)."""

from __future__ import annotations

import asyncio
from typing import Any

import docker
import httpx
import pytest
import redis

from tests.conftest import Api
from tests.containers import RedisContainer
from wrapper.protocol import token_key

pytestmark = pytest.mark.e2e

UPSTREAM_KEY = "sk-ant-scripted"  # full_stack_settings' upstream key

# Prints every process environment, command line and file (outside /proc, /sys) holding the
# key, then "searched".
_SEARCH = """
import os
key = (os.environ.pop("A") + os.environ.pop("B")).encode()
# docker exec gives this very process the container's configured environment: skip it.
for pid in set(filter(str.isdigit, os.listdir("/proc"))) - {str(os.getpid())}:
    for part in ("environ", "cmdline"):
        try:
            if key in open(f"/proc/{pid}/{part}", "rb").read():
                print(f"/proc/{pid}/{part}")
        except OSError:
            pass
for top, dirs, files in os.walk("/"):
    if top == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev")]
    for name in files:
        path = os.path.join(top, name)
        try:
            if not os.path.islink(path) and os.path.isfile(path) and key in open(path, "rb").read():
                print(path)
        except OSError:
            pass
print("searched")
"""


async def _create(api: Api, **config: Any) -> str:
    r = await api.http.post("/api/v1/sessions", json={"config": config})
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


async def _chat(api: Api, sid: str, prompt: str) -> dict[str, Any]:
    r = await api.http.post(
        f"/api/v1/sessions/{sid}/chat", json={"prompt": prompt, "stream": False}
    )
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


async def test_the_upstream_key_is_in_no_process_file_or_environment(
    make_api: Any, docker_client: docker.DockerClient
) -> None:
    api: Api = make_api()
    sid = await _create(api)
    done = await _chat(api, sid, "bash echo hi")
    assert done["status"] == "completed" and done["total_cost_usd"] > 0
    container = docker_client.containers.get(f"ccgate-{sid}")
    env = container.attrs["Config"]["Env"]
    assert not any(UPSTREAM_KEY in e for e in env)
    assert any(e.startswith("ANTHROPIC_API_KEY=ccgate-sk-") for e in env)
    # Every process's environment and command line, and every file, searched as root.
    # Searched in Python with the key in two halves, so no command line holds it.
    half = len(UPSTREAM_KEY) // 2
    _, out = container.exec_run(
        ["python3", "-c", _SEARCH],
        user="root",
        environment={"A": UPSTREAM_KEY[:half], "B": UPSTREAM_KEY[half:]},
    )
    assert out.decode().split() == ["searched"], out.decode()


async def test_the_metered_cost_is_the_proxys_and_the_session_credential_dies_with_it(
    make_api: Any, docker_client: docker.DockerClient
) -> None:
    api: Api = make_api()
    sid = await _create(api)
    first = await _chat(api, sid, "write a.txt metered")
    usage = (await api.http.get(f"/api/v1/sessions/{sid}/usage")).json()
    requests = usage["requests"]
    assert len(requests) >= 2 and all(r["turn_id"] == first["message_id"] for r in requests)
    assert first["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in requests))
    session = (await api.http.get(f"/api/v1/sessions/{sid}")).json()
    assert session["total_cost_usd"] == pytest.approx(usage["total"]["cost_usd"])
    assert session["usage"]["input_tokens"] == usage["total"]["input_tokens"]
    daily = (await api.http.get("/api/v1/usage")).json()
    assert daily["user"] == api.user and daily["total"]["requests"] == len(requests)
    assert daily["total"]["cost_usd"] == pytest.approx(usage["total"]["cost_usd"])
    other = await api.http.get("/api/v1/usage", params={"user": "someone-else"})
    assert other.status_code == 403
    # The pinned CLI called nothing the proxy does not serve (an unknown route is counted).
    metrics = (await api.http.get("/metrics")).text
    assert 'ccgate_proxy_requests_total{route="messages",status="200"}' in metrics
    assert 'route="unknown"' not in metrics

    container = docker_client.containers.get(f"ccgate-{sid}")
    env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])
    key, base = env["ANTHROPIC_API_KEY"], env["ANTHROPIC_BASE_URL"]
    probe = (
        "import sys, urllib.request, urllib.error\n"
        f"req = urllib.request.Request('{base}/v1/models', headers={{'x-api-key': '{key}'}})\n"
        "try:\n    print(urllib.request.urlopen(req, timeout=10).status)\n"
        "except urllib.error.HTTPError as e:\n    print(e.code)\n"
    )
    _, out = container.exec_run(["python3", "-c", probe], user="1000")
    assert out.decode().strip() == "200", out.decode()
    assert (await api.http.post(f"/api/v1/sessions/{sid}/stop")).status_code == 200
    # The container is gone; the credential, replayed from anywhere, is refused once the
    # replica's credential cache (CCGATE_PROXY_CREDENTIAL_CACHE_S, 1 s) has expired.
    await asyncio.sleep(1.1)
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(api.gateway.url + "/model/v1/models", headers={"x-api-key": key})
    assert r.status_code == 401, r.text


async def test_a_session_budget_ends_the_turn_with_an_error_naming_it(make_api: Any) -> None:
    api: Api = make_api()
    budget = 0.001  # the CLI's first request alone costs more (its prompt is thousands of tokens)
    sid = await _create(api, session_budget_usd=budget)
    done = await _chat(api, sid, "write over-budget.txt never written")
    assert done["status"] == "failed" and done["is_error"] is True
    assert "session budget" in (done["result"] or ""), done["result"]
    usage = (await api.http.get(f"/api/v1/sessions/{sid}/usage")).json()
    costs = [r["cost_usd"] for r in usage["requests"]]
    assert len(costs) == 1  # the request after the budget was spent never went upstream
    assert budget < usage["total"]["cost_usd"] <= budget + max(costs)
    again = await _chat(api, sid, "echo still there?")
    assert again["status"] == "failed" and "session budget" in (again["result"] or "")


async def test_three_concurrent_children_stop_at_the_tree_budget(make_api: Any) -> None:
    api: Api = make_api()
    budget = 0.03
    root = await _create(api, max_budget_usd=budget)

    async def spawn() -> str:
        r = await api.http.post(f"/api/v1/sessions/{root}/spawn", json={"prompt": "multi"})
        assert r.status_code == 201, r.text
        return str(r.json()["child_session_id"])

    # Three children at once, four model calls each: more than the budget allows.
    children = await asyncio.gather(spawn(), spawn(), spawn())

    async def wait(child: str) -> dict[str, Any]:
        r = await api.http.post(f"/api/v1/sessions/{child}/wait", json={"timeout_seconds": 120})
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        return result

    results = await asyncio.gather(*(wait(c) for c in children))
    tree = (await api.http.get(f"/api/v1/sessions/{root}/tree")).json()
    largest = 0.0
    spent = 0.0
    for child in children:
        usage = (await api.http.get(f"/api/v1/sessions/{child}/usage")).json()
        largest = max([largest, *(r["cost_usd"] for r in usage["requests"])])
        spent += usage["total"]["cost_usd"]
    assert tree["tree_counters"]["spend_usd"] == pytest.approx(spent)
    assert tree["totals"]["total_cost_usd"] == pytest.approx(spent)
    assert budget <= spent <= budget + largest
    stopped = [r for r in results if r["status"] == "failed"]
    assert stopped, [r["status"] for r in results]
    assert all("tree budget" in (r["result"] or "") for r in stopped)


async def test_the_agent_cannot_read_the_wrappers_redis_login_or_gain_privileges(
    make_api: Any, docker_client: docker.DockerClient, redis_server: RedisContainer
) -> None:
    api: Api = make_api()
    sid = await _create(api)
    # From the agent's own Bash tool: no capability, no-new-privileges, uid 1000, and the
    # wrapper's environment (PID 1 is tini, the wrapper's parent, as root) is unreadable.
    done = await _chat(
        api,
        sid,
        "bash id -u; grep -E '^(CapEff|CapPrm|CapAmb|NoNewPrivs)' /proc/self/status; "
        "cat /proc/1/environ >/dev/null 2>&1 && echo environ-readable || echo environ-denied; "
        "ls /var/lib/ccgate >/dev/null 2>&1 && echo state-readable || echo state-denied; "
        "ls -l /var/run/docker.sock 2>&1 | grep -c 'No such file'",
    )
    words = (done["result"] or "").removeprefix("Output:").split()
    assert words == [
        "1000",
        "CapPrm:",
        "0000000000000000",
        "CapEff:",
        "0000000000000000",
        "CapAmb:",
        "0000000000000000",
        "NoNewPrivs:",
        "1",
        "environ-denied",
        "state-denied",
        "1",
    ], done["result"]

    container = docker_client.containers.get(f"ccgate-{sid}")
    env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])
    password = env["CCGATE_REDIS_URL"].split("@", 1)[0].rsplit(":", 1)[1]
    # The session's gateway token (what the ccgate tools call the gateway with) is in the
    # wrapper's memory only: the tools are served in-process, not by a process of uid 1000.
    gateway_token = redis.Redis.from_url(redis_server.url).get(token_key(sid))
    assert gateway_token
    # Everything uid 1000 can read: no process environment, command line or file holds the
    # session's Redis password or its gateway token.
    for secret in (password, gateway_token.decode()):
        half = len(secret) // 2
        _, out = container.exec_run(
            ["python3", "-c", _SEARCH],
            user="1000",
            environment={"A": secret[:half], "B": secret[half:]},
        )
        assert out.decode().split() == ["searched"], out.decode()


async def test_the_agent_cannot_forge_a_turn_completed(
    make_api: Any, docker_client: docker.DockerClient
) -> None:
    """The agent tries to append a turn_completed claiming a made-up result and cost to its
    own stream. It has no Redis login (the wrapper's is out of its reach), so Redis refuses;
    the turn and the metered cost stay what they were."""
    api: Api = make_api()
    sid = await _create(api)
    done = await _chat(api, sid, "echo genuine")
    before = (await api.http.get(f"/api/v1/sessions/{sid}")).json()
    container = docker_client.containers.get(f"ccgate-{sid}")
    env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])
    hostport = env["CCGATE_REDIS_URL"].rsplit("@", 1)[1].split("/", 1)[0]
    forge = f"""
import json, redis
envelope = {{"seq": 999, "session_id": "{sid}", "turn_id": "{done["message_id"]}", "ts": 0,
            "type": "turn_completed", "source": "wrapper",
            "data": {{"result": "forged", "total_cost_usd": 999, "is_error": False}}}}
client = redis.Redis.from_url("redis://{hostport}/0", socket_timeout=5)
try:
    client.xadd("ccgate:session:{sid}:events", {{"e": json.dumps(envelope)}}, id="999-0")
    print("appended")
except redis.RedisError as exc:
    print("refused", type(exc).__name__)
"""
    _, out = container.exec_run(["/opt/ccgate/bin/python", "-c", forge], user="1000")
    assert out.decode().split()[0] == "refused", out.decode()
    after = (await api.http.get(f"/api/v1/sessions/{sid}")).json()
    message = (await api.http.get(f"/api/v1/sessions/{sid}/messages/{done['message_id']}")).json()
    assert message["result"] == done["result"] and message["cost_usd"] == done["cost_usd"]
    assert after["total_cost_usd"] == before["total_cost_usd"]
