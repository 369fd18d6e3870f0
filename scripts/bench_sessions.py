"""Session benchmark: cold start, warm-pool claim, a burst of creates, chat and turn latency.

Runs real servers (Redis, PostgreSQL, the scripted model, the gateway) on this machine and, for
each of N sessions, measures with a WebSocket client:

  ready        POST /sessions sent -> ``ready`` event received; cold (no pool), then warm (a
               pool of 10: each create claims an initialized container; the pool is refilled
               between creates, outside the timed part)
  burst        10 concurrent creates with 10 ready pool containers: each create's POST ->
               ready, and the whole burst's last ready
  first_event  POST /chat sent -> first event of that turn received (``turn_started``): the
               first chat of each session above, and ``--chats`` chats on one settled session
  turn         POST /chat sent -> ``turn_completed`` received (a Write tool turn: two model calls)

Baseline, measured in the same run: the same image driven without ccgate, the way a home-made
loop would (``docker run -i`` + the CLI on stdin): container start -> CLI ``initialize`` answer,
and a user line -> ``result`` for the same scripted turn. Each bare sample is taken just before
a cold session's (interleaved, with the gateway idle), so drift of the machine's speed over the
run shows in both; warm sessions get their own interleaved bare turns. Prints p50/p95/p99 and
ratios.

Usage: .venv/bin/python scripts/bench_sessions.py [--sessions 20] [--bursts 3] [--chats 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.auth import mint_token
from gateway.config import Settings
from scripted_model import ScriptedModelServer
from tests.servers import GatewayProcess, PostgresServer, RedisServer

IMAGE = "ccgate-session:latest"
PROMPT = "write bench.txt benchmark"
POOL_SIZE = 10
JWT_SECRET = secrets.token_urlsafe(32)
JWT_KEY = Settings(jwt_secret=JWT_SECRET).jwt_key()  # type: ignore[arg-type]


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile of ``values`` (milliseconds)."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def row(name: str, values: list[float], baseline: list[float] | None = None) -> str:
    """One table row: p50 / p95 / p99 in ms, and the p50 ratio to the baseline."""
    cells = f"{name:<34} {pct(values, 50):8.0f} {pct(values, 95):8.0f} {pct(values, 99):8.0f}"
    if baseline:
        cells += f"   x{pct(values, 50) / pct(baseline, 50):.2f}"
    return cells


async def _ready(ws: ClientConnection) -> dict[str, object]:
    while True:
        event = json.loads(await ws.recv())
        if event.get("type") == "ready":
            return dict(event["data"])


async def _pool_ready(http: httpx.AsyncClient, at_least: int) -> None:
    """Wait until the pool has ``at_least`` ready containers (read from /metrics)."""
    deadline = time.monotonic() + 120
    while True:
        text = (await http.get("/metrics")).text
        ready = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("ccgate_pool_containers{") and 'status="ready"' in line
        )
        if ready >= at_least:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pool never reached {at_least} ready containers")
        await asyncio.sleep(0.05)


async def _session_once(
    http: httpx.AsyncClient, gateway: GatewayProcess, token: str, *, pooled: bool
) -> tuple[float, float, float]:
    """One session: POST /sessions -> ready, then one chat: POST -> first event of the turn,
    POST -> turn_completed (ms). With ``pooled``, waits (untimed) for a full pool first."""
    if pooled:
        await _pool_ready(http, POOL_SIZE)
    t0 = time.perf_counter()
    r = await http.post("/api/v1/sessions", json={})
    r.raise_for_status()
    sid = r.json()["session_id"]
    url = f"{gateway.ws_url}/api/v1/sessions/{sid}/stream?token={token}"
    async with connect(url, max_size=None) as ws:
        ready = await _ready(ws)
        if pooled != bool(ready.get("pooled")):
            raise RuntimeError(f"expected pooled={pooled}: {ready}")
        ready_ms = (time.perf_counter() - t0) * 1000
        if pooled:  # the refill behind the claim would compete for the 2 cores
            await _pool_ready(http, POOL_SIZE)
        first_ms, turn_ms = await _chat(http, ws, sid, PROMPT)
    await http.delete(f"/api/v1/sessions/{sid}")
    return ready_ms, first_ms, turn_ms


async def _chat(
    http: httpx.AsyncClient, ws: ClientConnection, sid: str, prompt: str
) -> tuple[float, float]:
    """One prompt: POST /chat -> the turn's first event, and -> ``turn_completed`` (ms)."""
    t0 = time.perf_counter()
    r = await http.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": prompt})
    mid = r.json()["message_id"]
    first = None
    while True:
        event = json.loads(await ws.recv())
        if event.get("turn_id") != mid:
            continue
        if first is None:
            first = (time.perf_counter() - t0) * 1000
        if event["type"] == "turn_completed":
            return first, (time.perf_counter() - t0) * 1000


async def bench_gateway(
    gateway: GatewayProcess, n: int, *, pooled: bool = False, model_port: int | None = None
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Measure N sessions through the gateway, one after another (with ``pooled``, each
    create waits, untimed, for a full pool first). With ``model_port``, each session follows
    a bare run (bench_bare) measured just before it, so both see the machine in the same
    state (this machine's speed drifts by tens of percent over minutes)."""
    token = mint_token(key=JWT_KEY, user="bench", ttl_s=3600)
    headers = {"Authorization": f"Bearer {token}"}
    out: dict[str, list[float]] = {"ready": [], "first_event": [], "turn": []}
    bare: dict[str, list[float]] = {"ready": [], "turn": []}
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=120) as http:
        for _ in range(n):
            if model_port is not None:
                bare_ready, bare_turn = await asyncio.to_thread(bare_once, model_port)
                bare["ready"].append(bare_ready)
                bare["turn"].append(bare_turn)
            ready_ms, first_ms, turn_ms = await _session_once(http, gateway, token, pooled=pooled)
            out["ready"].append(ready_ms)
            out["first_event"].append(first_ms)
            out["turn"].append(turn_ms)
    return out, bare


async def bench_settled(gateway: GatewayProcess, chats: int) -> list[float]:
    """One session, settled (2 s after ``ready``), ``chats`` short prompts one after another,
    0.5 s apart: POST /chat -> the turn's first event at the WS client (ms)."""
    token = mint_token(key=JWT_KEY, user="settled", ttl_s=3600)
    headers = {"Authorization": f"Bearer {token}"}
    out: list[float] = []
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=120) as http:
        r = await http.post("/api/v1/sessions", json={})
        r.raise_for_status()
        sid = r.json()["session_id"]
        url = f"{gateway.ws_url}/api/v1/sessions/{sid}/stream?token={token}"
        async with connect(url, max_size=None) as ws:
            await _ready(ws)
            await asyncio.sleep(2.0)
            for _ in range(chats):
                first_ms, _ = await _chat(http, ws, sid, "say hi")
                out.append(first_ms)
                await asyncio.sleep(0.5)
        await http.delete(f"/api/v1/sessions/{sid}")
    return out


async def bench_burst(gateway: GatewayProcess, bursts: int) -> dict[str, list[float]]:
    """``bursts`` times: wait for a full pool, then 10 concurrent creates; each create's POST ->
    ready, and each burst's first POST -> last ready."""
    token = mint_token(key=JWT_KEY, user="burst", ttl_s=3600)
    headers = {"Authorization": f"Bearer {token}"}
    out: dict[str, list[float]] = {"each": [], "all": [], "pooled": []}
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=120) as http:
        for _ in range(bursts):
            await _pool_ready(http, POOL_SIZE)
            t0 = time.perf_counter()

            async def one(t0: float) -> tuple[str, float, bool]:
                r = await http.post("/api/v1/sessions", json={})
                r.raise_for_status()
                sid = r.json()["session_id"]
                url = f"{gateway.ws_url}/api/v1/sessions/{sid}/stream?token={token}"
                async with connect(url, max_size=None) as ws:
                    ready = await _ready(ws)
                return sid, (time.perf_counter() - t0) * 1000, bool(ready.get("pooled"))

            results = await asyncio.gather(*(one(t0) for _ in range(POOL_SIZE)))
            out["each"] += [ms for _, ms, _ in results]
            out["all"].append(max(ms for _, ms, _ in results))
            out["pooled"].append(sum(1 for *_, p in results if p))
            for sid, _, _ in results:
                await http.delete(f"/api/v1/sessions/{sid}")
    return out


def bare_once(model_port: int) -> tuple[float, float]:
    """The same image and CLI without ccgate: docker run -i -> the CLI's ``initialize``
    answer, then one turn on stdin -> ``result`` (ms)."""
    init = {"type": "control_request", "request_id": "r1", "request": {"subtype": "initialize"}}
    sid = str(uuid.uuid4())
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            "docker", "run", "--rm", "-i", "--user", "1000:1000",
            "--add-host", "host.docker.internal:host-gateway",
            "-e", f"ANTHROPIC_BASE_URL=http://host.docker.internal:{model_port}",
            "-e", "ANTHROPIC_API_KEY=sk-ant-bench", "--entrypoint", "claude", IMAGE,
            "--input-format=stream-json", "--output-format=stream-json", "--verbose",
            f"--session-id={sid}", "--model=claude-sonnet-4-5",
            "--permission-mode=bypassPermissions",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write((json.dumps(init) + "\n").encode())
    proc.stdin.flush()
    while json.loads(proc.stdout.readline()).get("type") != "control_response":
        pass
    ready_ms = (time.perf_counter() - t0) * 1000
    t1 = time.perf_counter()
    message = {"type": "user", "message": {"role": "user", "content": PROMPT}}
    proc.stdin.write((json.dumps(message) + "\n").encode())
    proc.stdin.flush()
    while json.loads(proc.stdout.readline()).get("type") != "result":
        pass
    turn_ms = (time.perf_counter() - t1) * 1000
    proc.stdin.close()
    proc.wait(timeout=30)
    return ready_ms, turn_ms


def main() -> None:
    """Run every measurement and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--chats", type=int, default=40)
    args = parser.parse_args()
    redis_server = RedisServer().start()
    postgres = PostgresServer().start()
    model = ScriptedModelServer(host="0.0.0.0", port=0).start()

    def settings(**extra: Any) -> dict[str, object]:
        return {
            "data_dir": tempfile.mkdtemp(prefix="ccgate-bench-"),
            "jwt_secret": JWT_SECRET,
            "database_url": postgres.url,
            "redis_url": redis_server.url,
            "anthropic_base_url": f"http://127.0.0.1:{model.port}",
            "anthropic_api_key": "sk-ant-bench",
            "rate_limit": "",  # the benchmark is one user firing as fast as it can
            "image": IMAGE,
            **extra,
        }

    # The gateway runs as its own process (``ccgate serve``), like a deployment: a gateway in a
    # thread of this process would share its GIL with the measuring client.
    try:
        gateway = GatewayProcess(settings()).start()
        try:
            cold, bare = asyncio.run(bench_gateway(gateway, args.sessions, model_port=model.port))
            settled = asyncio.run(bench_settled(gateway, args.chats))
        finally:
            gateway.stop()
        pool = json.dumps([{"name": "bench", "min_size": POOL_SIZE}])
        gateway = GatewayProcess(settings(warm_pool=pool, warm_pool_refill_concurrency=4)).start()
        try:
            warm, bare_warm = asyncio.run(
                bench_gateway(gateway, args.sessions, pooled=True, model_port=model.port)
            )
            burst = asyncio.run(bench_burst(gateway, args.bursts))
        finally:
            gateway.stop()
            _remove_pool(Settings(**settings()).deployment_id)  # type: ignore[arg-type]
    finally:
        model.stop()
        postgres.stop()
        redis_server.stop()
    print(f"\n{args.sessions} sessions each, sequential; {args.bursts} bursts of {POOL_SIZE}; ms")
    print(f"{'measure':<40} {'p50':>8} {'p95':>8} {'p99':>8}   p50 vs baseline")
    print(row("baseline: docker run -> CLI ready", bare["ready"]))
    print(row("cold: POST /sessions -> ready", cold["ready"], bare["ready"]))
    print(row("warm: POST /sessions -> ready (claim)", warm["ready"], bare["ready"]))
    print(row("burst of 10: each POST -> ready", burst["each"], bare["ready"]))
    print(row("burst of 10: first POST -> last ready", burst["all"], bare["ready"]))
    print(row("cold session: chat -> first event (WS)", cold["first_event"]))
    print(row("warm session: chat -> first event (WS)", warm["first_event"]))
    print(row("settled session: chat -> first event", settled))
    print(row("baseline: bare CLI turn (beside cold)", bare["turn"]))
    print(row("cold session: chat -> turn_completed", cold["turn"], bare["turn"]))
    print(row("baseline: bare CLI turn (beside warm)", bare_warm["turn"]))
    print(row("warm session: chat -> turn_completed", warm["turn"], bare_warm["turn"]))
    print(f"(bursts served from the pool: {burst['pooled']} of {POOL_SIZE} each)")


def _remove_pool(deployment: str) -> None:
    """Remove the pool containers and volumes the pooled gateway leaves (a deployment keeps
    them across restarts; the benchmark's ends here)."""
    subprocess.run(
        f"docker ps -aq --filter label=ccgate.pool --filter label=ccgate.deployment={deployment}"
        " | xargs -r docker rm -f",
        shell=True,
        check=False,
        capture_output=True,
    )
    subprocess.run(
        "docker volume ls -q --filter label=ccgate.pool | xargs -r docker volume rm -f",
        shell=True,
        check=False,
        capture_output=True,
    )


if __name__ == "__main__":
    main()
