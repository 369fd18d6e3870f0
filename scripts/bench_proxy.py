"""Model proxy benchmark: what the gateway's proxy adds to the CLI's model calls.

Three processes — Redis, the scripted model (the upstream) and a gateway (`ccgate serve`, SQLite
or PostgreSQL) — and one client. Each round sends the same Messages API request twice, once
straight to the upstream (the baseline, measured in the same run) and once through
``<gateway>/model`` with a session credential, alternating so drift hits both alike:

  first byte   request sent → first body chunk of a streamed reply (a short "Echo" reply).
               The proxied path includes the credential lookup, the budget reservation when
               a budget is set, and the upstream connection from the gateway's pool.
  per chunk    a reply of CHUNKS deltas sent 2 ms apart ("timed N 2"), each stamped by the
               upstream with the time it was sent: receive time - send time, per delta.

Printed: p50/p95/p99 of each path and the added latency at p50 (proxied - direct); the same
with a session budget set (reserve + commit on every request).

Usage: .venv/bin/python scripts/bench_proxy.py [--rounds 200] [--chunks 400] [--postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.db.engine import make_db_factory, make_engine
from gateway.db.models import Session, SessionStatus, SpawnTree
from gateway.services.metering.credentials import new_proxy_key
from tests.servers import GatewayProcess, PostgresServer, RedisServer, free_port, wait_until


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[49], cuts[94], cuts[98]


def _body(prompt: str) -> dict[str, object]:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "stream": True,
        "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
        "tools": [{"name": "Bash", "description": "run", "input_schema": {"type": "object"}}],
    }


async def _first_byte(http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> float:
    """Milliseconds from sending a request to the first body chunk of its streamed reply."""
    started = time.perf_counter()
    async with http.stream("POST", url, json=_body("hello"), headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        first = 0.0
        async for _ in response.aiter_raw():
            first = first or time.perf_counter()
    return (first - started) * 1000


async def _chunk_delays(
    http: httpx.AsyncClient, url: str, headers: dict[str, str], count: int, interval_ms: float
) -> list[float]:
    """Milliseconds from the upstream sending each delta to the client receiving it (the
    scripted model stamps each delta with time.time(); same machine, same clock)."""
    delays: list[float] = []
    buffer = b""
    prompt = f"timed {count} {interval_ms}"
    async with http.stream("POST", url, json=_body(prompt), headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for chunk in response.aiter_raw():
            now = time.time()
            buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if b"text_delta" not in event:
                    continue
                data = json.loads(event.split(b"data: ", 1)[1])
                sent = float(data["delta"]["text"].rstrip(";"))
                delays.append((now - sent) * 1000)
    return delays


async def _session(db_url: str, *, budget: float | None) -> str:
    engine = make_engine(db_url)
    key, key_hash = new_proxy_key()
    sid = str(uuid.uuid4())
    async with make_db_factory(engine)() as db:
        db.add(SpawnTree(root_id=sid, owner="bench"))
        await db.flush()
        db.add(
            Session(
                id=sid,
                owner="bench",
                status=SessionStatus.IDLE,
                workspace_volume="v",
                root_id=sid,
                proxy_key_hash=key_hash,
                budget_usd=budget,
            )
        )
        await db.commit()
    await engine.dispose()
    return key


async def _measure(
    label: str, direct: str, proxied: str, key: str, rounds: int, chunks: int
) -> None:
    limits = httpx.Limits(max_keepalive_connections=4)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        auth = {"x-api-key": key, "anthropic-version": "2023-06-01"}
        for _ in range(10):  # warm both paths' connection pools
            await _first_byte(http, direct, {})
            await _first_byte(http, proxied, auth)
        ttfb: dict[str, list[float]] = {"direct": [], "proxied": []}
        per_chunk: dict[str, list[float]] = {"direct": [], "proxied": []}
        for _ in range(rounds):
            for name, url, headers in (("direct", direct, {}), ("proxied", proxied, auth)):
                ttfb[name].append(await _first_byte(http, url, headers))
        for _ in range(max(2, rounds // 50)):
            for name, url, headers in (("direct", direct, {}), ("proxied", proxied, auth)):
                per_chunk[name] += await _chunk_delays(http, url, headers, chunks, 2.0)
    print(f"\n{label}")
    print(f"{'':24}{'p50':>9}{'p95':>9}{'p99':>9}   (ms)")
    for title, table in (("first byte", ttfb), ("per chunk", per_chunk)):
        for name in ("direct", "proxied"):
            p50, p95, p99 = _quantiles(table[name])
            print(f"{title + ' ' + name:24}{p50:9.3f}{p95:9.3f}{p99:9.3f}")
        added = _quantiles(table["proxied"])[0] - _quantiles(table["direct"])[0]
        print(f"{title + ' added (p50)':24}{added:9.3f}")


async def amain(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ccgate-bench-proxy-"))
    redis = RedisServer().start()
    postgres = PostgresServer().start() if args.postgres else None
    model_port = free_port()
    model = subprocess.Popen(  # noqa: ASYNC220 (set-up, before anything is measured)
        [sys.executable, "-m", "gateway.cli", "scripted-model", "--host", "127.0.0.1",
         "--port", str(model_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    db_url = postgres.url if postgres else f"sqlite+aiosqlite:///{tmp / 'ccgate.db'}"
    gateway = GatewayProcess(
        {
            "data_dir": tmp,
            "database_url": db_url,
            "redis_url": redis.url,
            "anthropic_base_url": f"http://127.0.0.1:{model_port}",
            "anthropic_api_key": "sk-ant-bench",
            "rate_limit": "",  # throughput of one user is measured, not the limiter
            "jwt_secret": "bench-secret-" + "x" * 40,
            "log_level": "WARNING",
        }
    )
    try:
        import socket

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", model_port)) == 0

        wait_until(listening, timeout_s=20, what="scripted model")
        gateway.start()
        direct = f"http://127.0.0.1:{model_port}/v1/messages?beta=true"
        proxied = f"{gateway.url}/model/v1/messages?beta=true"
        db = "PostgreSQL" if postgres else "SQLite"
        print(f"model proxy benchmark: {args.rounds} rounds, {args.chunks} chunks, {db}")
        key = await _session(db_url, budget=None)
        await _measure("no budget", direct, proxied, key, args.rounds, args.chunks)
        key = await _session(db_url, budget=1_000_000.0)
        await _measure(
            "session budget (reserve + commit)", direct, proxied, key, args.rounds, args.chunks
        )
    finally:
        gateway.stop()
        model.terminate()
        model.wait(timeout=10)
        redis.stop()
        if postgres:
            postgres.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--postgres", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
