"""Lifecycle benchmark: resume latency beside a cold start, memory per idle session, and what
paused sessions cost.

Runs real servers (Redis, PostgreSQL, the scripted model, the gateway, Docker) on this machine:

  cold      POST /sessions sent -> ``ready`` at a WebSocket client (a new session)
  resume    a paused session: POST /chat sent -> first event of that turn at the client
            (new container, ``claude --resume``, ``ready``, then the turn), beside
  warm      the same chat on a live idle session -> its first event (the floor)

Then ``--live`` idle sessions are started and left idle: the memory each uses (``docker
stats``, the container's cgroup) and how many fit in this host's memory with the admission
reserve. Finally ``--paused`` synthetic paused sessions (database rows, as a paused session has)
measure the lifecycle loop's pass and the reaper's sweep at that scale, and one real paused
session's footprint (volumes on disk, Redis memory) is reported per session.

Usage: .venv/bin/python scripts/bench_lifecycle.py [--sessions 10] [--live 20] [--paused 10000]
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
from gateway.db.models import Session, SessionStatus, SpawnTree, utcnow
from gateway.services.admission import available_memory_mib
from scripted_model import ScriptedModelServer
from scripts.bench_sessions import pct
from tests.servers import GatewayServer, PostgresServer, RedisServer

IMAGE = "ccgate-session:latest"


def row(name: str, values: list[float], baseline: list[float] | None = None) -> str:
    """p50 / p95 / p99 in ms, and the p50 ratio to ``baseline``."""
    cells = f"{name:<44} {pct(values, 50):8.0f} {pct(values, 95):8.0f} {pct(values, 99):8.0f}"
    if baseline:
        cells += f"   x{pct(values, 50) / pct(baseline, 50):.2f}"
    return cells


async def _until(ws: ClientConnection, kind: str, turn_id: str | None = None) -> dict[str, Any]:
    while True:
        event: dict[str, Any] = json.loads(await ws.recv())
        if event.get("type") == kind and (turn_id is None or event.get("turn_id") == turn_id):
            return event


async def _idle(http: httpx.AsyncClient, sid: str, timeout_s: float = 120) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if (await http.get(f"/api/v1/sessions/{sid}")).json()["status"] == "idle":
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"session {sid} never became idle")


def _volumes_kib(sid: str) -> float:
    """Disk used by the session's two volumes (``du``), in KiB."""
    disk = 0.0
    for volume in (f"ccgate-ws-{sid}", f"ccgate-cfg-{sid}"):
        path = subprocess.run(
            ["docker", "volume", "inspect", "-f", "{{.Mountpoint}}", volume],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        du = subprocess.run(["du", "-sk", path], capture_output=True, text=True, check=True)
        disk += float(du.stdout.split()[0])
    return disk


async def _first_of_turn(ws: ClientConnection, turn_id: str) -> None:
    while json.loads(await ws.recv()).get("turn_id") != turn_id:
        pass


async def bench_resume(
    gateway: GatewayServer, http: httpx.AsyncClient, token: str, n: int
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"cold": [], "warm": [], "resume": []}
    for _ in range(n):
        t0 = time.perf_counter()
        sid = (await http.post("/api/v1/sessions", json={})).json()["session_id"]
        url = f"{gateway.ws_url}/api/v1/sessions/{sid}/stream?token={token}"
        async with connect(url, max_size=None) as ws:
            await _until(ws, "ready")
            out["cold"].append((time.perf_counter() - t0) * 1000)
            t1 = time.perf_counter()
            mid = (
                await http.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "hello"})
            ).json()["message_id"]
            await _first_of_turn(ws, mid)
            out["warm"].append((time.perf_counter() - t1) * 1000)
            await _until(ws, "turn_completed", mid)
            await _idle(http, sid)
            paused = await http.post(f"/api/v1/sessions/{sid}/pause")
            assert paused.status_code == 200, paused.text
            t2 = time.perf_counter()
            mid = (
                await http.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "recall"})
            ).json()["message_id"]
            await _first_of_turn(ws, mid)
            out["resume"].append((time.perf_counter() - t2) * 1000)
            done = await _until(ws, "turn_completed", mid)
            assert done["data"]["result"] == "You first said: hello", done
        await http.delete(f"/api/v1/sessions/{sid}")
    return out


def _container_memory_mib(names: list[str]) -> list[float]:
    """Memory use of each container (``docker stats``), in MiB."""
    out = subprocess.run(
        ["docker", "stats", "--no-stream", "--format", "{{.Name}} {{.MemUsage}}", *names],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sizes = []
    for line in out.splitlines():
        used = line.split()[1]
        number = float(used.rstrip("KMGiB"))
        unit = used.lstrip("0123456789.")
        sizes.append(number * {"KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0}.get(unit, 1.0))
    return sizes


async def bench_idle(http: httpx.AsyncClient, n: int) -> tuple[list[float], int]:
    sids = []
    for _ in range(n):
        sids.append((await http.post("/api/v1/sessions", json={})).json()["session_id"])
    for sid in sids:
        await _idle(http, sid)
    await asyncio.sleep(5)  # let them settle
    sizes = await asyncio.to_thread(_container_memory_mib, [f"ccgate-{sid}" for sid in sids])
    available = available_memory_mib() or 0
    for sid in sids:
        await http.delete(f"/api/v1/sessions/{sid}")
    return sizes, available


async def in_gateway(gateway: GatewayServer, coro: Any) -> Any:
    """Run ``coro`` on the gateway's own event loop (its clients are bound to it)."""
    future = asyncio.run_coroutine_threadsafe(coro, gateway.app.state.loop)
    return await asyncio.wrap_future(future)


async def bench_paused_scale(gateway: GatewayServer, n: int) -> dict[str, float]:
    """Insert ``n`` paused sessions (rows as a real pause leaves them) and time one lifecycle
    pass and one reaper sweep over them."""
    factory = gateway.app.state.db_factory
    async with factory() as db:
        for start in range(0, n, 1000):
            for _ in range(start, min(n, start + 1000)):
                sid = str(uuid.uuid4())
                db.add(SpawnTree(root_id=sid, owner="bench-paused"))
                db.add(
                    Session(
                        id=sid,
                        owner="bench-paused",
                        status=SessionStatus.PAUSED,
                        paused_reason="idle",
                        workspace_volume=f"ccgate-ws-{sid}",
                        root_id=sid,
                        last_activity=utcnow(),
                    )
                )
            await db.commit()
    loop = gateway.app.state.lifecycle
    reaper = gateway.app.state.reaper
    t0 = time.perf_counter()
    await loop.tick()
    tick_ms = (time.perf_counter() - t0) * 1000
    t1 = time.perf_counter()
    await reaper.sweep()
    sweep_ms = (time.perf_counter() - t1) * 1000
    return {"tick_ms": tick_ms, "sweep_ms": sweep_ms}


async def paused_footprint(http: httpx.AsyncClient, gateway: GatewayServer) -> dict[str, float]:
    """One real paused session after a turn: its volumes on disk and its Redis keys."""
    sid = (await http.post("/api/v1/sessions", json={})).json()["session_id"]
    await http.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "hello", "stream": False})
    await _idle(http, sid)
    await http.post(f"/api/v1/sessions/{sid}/pause")
    disk = await asyncio.to_thread(_volumes_kib, sid)
    redis = gateway.app.state.redis

    async def redis_bytes() -> int:
        keys = [k async for k in redis.scan_iter(f"ccgate:session:{sid}:*")]
        return sum([int(await redis.memory_usage(k) or 0) for k in keys])

    memory = await in_gateway(gateway, redis_bytes())
    await http.delete(f"/api/v1/sessions/{sid}")
    return {"disk_kib": disk, "redis_bytes": float(memory)}


async def run(gateway: GatewayServer, args: argparse.Namespace) -> None:
    token = mint_token(key=gateway.app.state.jwt_key, user="bench", ttl_s=3600)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=120) as http:
        lat = await bench_resume(gateway, http, token, args.sessions)
        sizes, available = await bench_idle(http, args.live)
        footprint = await paused_footprint(http, gateway)
    scale = await in_gateway(gateway, bench_paused_scale(gateway, args.paused))
    print(f"\n{args.sessions} sessions, sequential; milliseconds")
    print(f"{'measure':<44} {'p50':>8} {'p95':>8} {'p99':>8}   p50 vs cold start")
    print(row("cold: POST /sessions -> ready", lat["cold"]))
    print(row("warm: chat on an idle session -> 1st event", lat["warm"]))
    print(row("resume: chat on a paused session -> 1st event", lat["resume"], lat["cold"]))
    mean = sum(sizes) / len(sizes)
    reserve = 1024
    fit = len(sizes) + int((available - reserve) / mean)
    print(f"\n{len(sizes)} idle sessions live at once: {mean:.0f} MiB each (min "
          f"{min(sizes):.0f}, max {max(sizes):.0f}); host MemAvailable {available} MiB with "
          f"all of them running -> about {fit} idle sessions fit above a {reserve} MiB "
          f"reserve")  # fmt: skip
    print(f"paused session footprint: {footprint['disk_kib']:.0f} KiB on disk (two volumes), "
          f"{footprint['redis_bytes'] / 1024:.1f} KiB in Redis, no process, no memory")  # fmt: skip
    print(f"{args.paused} paused sessions: lifecycle pass {scale['tick_ms']:.0f} ms, "
          f"reaper sweep {scale['sweep_ms']:.0f} ms")  # fmt: skip


def main() -> None:
    """Start the servers, run every measurement, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--live", type=int, default=20)
    parser.add_argument("--paused", type=int, default=10_000)
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
        rate_limit="",
        image=IMAGE,
        max_live_sessions_per_user=0,
        max_live_sessions=0,
    )
    gateway = GatewayServer(settings).start()
    try:
        asyncio.run(run(gateway, args))
    finally:
        gateway.stop()
        model.stop()
        postgres.stop()
        redis_server.stop()


if __name__ == "__main__":
    main()
