"""Session benchmark: start-to-ready, chat-to-first-event and whole-turn latency through ccgate.

Runs real servers (Redis, PostgreSQL, the scripted model, the gateway) on this machine and, for
each of N sessions, measures with a WebSocket client:

  ready        POST /sessions sent -> ``ready`` event received
  first_event  POST /chat sent -> first event of that turn received (``turn_started``)
  turn         POST /chat sent -> ``turn_completed`` received (a Write tool turn: two model calls)

Baseline, measured in the same run: the same image driven without ccgate, the way a home-made
loop would (``docker run -i`` + the CLI on stdin): container start -> CLI ``initialize`` answer,
and a user line -> ``result`` for the same scripted turn. Prints p50/p95/p99 and ratios.

Usage: .venv/bin/python scripts/bench_sessions.py [--sessions 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.auth import mint_token
from gateway.config import Settings
from scripted_model import ScriptedModelServer
from tests.servers import GatewayServer, PostgresServer, RedisServer

IMAGE = "ccgate-session:latest"
PROMPT = "write bench.txt benchmark"


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


async def bench_gateway(gateway: GatewayServer, n: int) -> dict[str, list[float]]:
    """Measure N sessions through the gateway, one after another."""
    token = mint_token(key=gateway.app.state.jwt_key, user="bench", ttl_s=3600)
    headers = {"Authorization": f"Bearer {token}"}
    out: dict[str, list[float]] = {"ready": [], "first_event": [], "turn": []}
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=120) as http:
        for _ in range(n):
            t0 = time.perf_counter()
            r = await http.post("/api/v1/sessions", json={})
            r.raise_for_status()
            sid = r.json()["session_id"]
            url = f"{gateway.ws_url}/api/v1/sessions/{sid}/stream?token={token}"
            async with connect(url, max_size=None) as ws:
                while json.loads(await ws.recv()).get("type") != "ready":
                    pass
                out["ready"].append((time.perf_counter() - t0) * 1000)
                t1 = time.perf_counter()
                r = await http.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": PROMPT})
                mid = r.json()["message_id"]
                first = None
                while True:
                    event = json.loads(await ws.recv())
                    if event.get("turn_id") != mid:
                        continue
                    if first is None:
                        first = (time.perf_counter() - t1) * 1000
                    if event["type"] == "turn_completed":
                        out["turn"].append((time.perf_counter() - t1) * 1000)
                        break
                out["first_event"].append(first or 0.0)
            await http.delete(f"/api/v1/sessions/{sid}")
    return out


def bench_bare(model_port: int, n: int) -> dict[str, list[float]]:
    """The same image and CLI without ccgate: docker run -i, initialize, one turn on stdin."""
    out: dict[str, list[float]] = {"ready": [], "turn": []}
    init = {"type": "control_request", "request_id": "r1", "request": {"subtype": "initialize"}}
    for _ in range(n):
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
        out["ready"].append((time.perf_counter() - t0) * 1000)
        t1 = time.perf_counter()
        message = {"type": "user", "message": {"role": "user", "content": PROMPT}}
        proc.stdin.write((json.dumps(message) + "\n").encode())
        proc.stdin.flush()
        while json.loads(proc.stdout.readline()).get("type") != "result":
            pass
        out["turn"].append((time.perf_counter() - t1) * 1000)
        proc.stdin.close()
        proc.wait(timeout=30)
    return out


def main() -> None:
    """Run both measurements and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=20)
    args = parser.parse_args()
    redis_server = RedisServer().start()
    postgres = PostgresServer().start()
    model = ScriptedModelServer(host="0.0.0.0", port=0).start()
    settings = Settings(
        data_dir=Path(tempfile.mkdtemp(prefix="ccgate-bench-")),
        jwt_secret=secrets.token_urlsafe(32),
        database_url=postgres.url,
        redis_url=redis_server.url,
        anthropic_base_url=f"http://127.0.0.1:{model.port}",
        anthropic_api_key="sk-ant-bench",
        rate_limit="",  # the benchmark is one user firing as fast as it can
        image=IMAGE,
    )
    gateway = GatewayServer(settings).start()
    try:
        bare = bench_bare(model.port, args.sessions)
        via = asyncio.run(bench_gateway(gateway, args.sessions))
    finally:
        gateway.stop()
        model.stop()
        postgres.stop()
        redis_server.stop()
    print(f"\n{args.sessions} sessions, sequential; milliseconds")
    print(f"{'measure':<34} {'p50':>8} {'p95':>8} {'p99':>8}   p50 vs baseline")
    print(row("baseline: docker run -> CLI ready", bare["ready"]))
    print(row("ccgate: POST /sessions -> ready", via["ready"], bare["ready"]))
    print(row("ccgate: chat -> first event (WS)", via["first_event"]))
    print(row("baseline: bare CLI turn (stdin)", bare["turn"]))
    print(row("ccgate: chat -> turn_completed", via["turn"], bare["turn"]))
    means = {k: statistics.mean(v) for k, v in via.items()}
    print(f"(ccgate means: ready {means['ready']:.0f} ms, turn {means['turn']:.0f} ms)")


if __name__ == "__main__":
    main()
