"""API latency with many open streams: one gateway process, SQLite (the embedded default).

A real session (its container idle) on a ``ccgate serve`` process with real Redis. Measures
``GET /api/v1/sessions/{id}`` (authorization + one query) sequentially, p50/p95/p99:
first with no stream open (the baseline, same run), then with 1,000 Server-Sent-Events streams
open on the session, then with 1,000 streams while events flow to all of them (20 events/s).

Usage: .venv/bin/python scripts/bench_streams.py [--streams 1000] [--samples 300]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import secrets
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.auth import mint_token
from scripted_model import ScriptedModelServer
from tests.servers import GatewayProcess, RedisServer
from wrapper.protocol import EventSource
from wrapper.publisher import EventPublisher


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))]


async def latencies(http: httpx.AsyncClient, path: str, samples: int) -> list[float]:
    """Sequential GETs; milliseconds each."""
    out: list[float] = []
    for _ in range(samples):
        started = time.perf_counter()
        response = await http.get(path)
        out.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.text
    return out


async def run(streams: int, samples: int) -> None:
    """Start everything, measure the three phases, print the table."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * streams + 1024)), hard))
    secret = secrets.token_urlsafe(32)
    tmp = Path(tempfile.mkdtemp(prefix="ccgate-bench-streams-"))
    redis_server = RedisServer().start()
    model = ScriptedModelServer(host="0.0.0.0", port=0).start()
    gateway = GatewayProcess(
        {
            "data_dir": tmp,
            "jwt_secret": secret,
            "redis_url": redis_server.url,
            "anthropic_base_url": f"http://host.docker.internal:{model.port}",
            "anthropic_api_key": "sk-ant-bench",
        }
    ).start()
    token = mint_token(key=secret, user=f"bench-{uuid.uuid4().hex[:6]}", ttl_s=3600)
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
    rows: list[tuple[str, list[float]]] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        async with (
            httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=60) as http,
            httpx.AsyncClient(
                base_url=gateway.url, headers=headers, timeout=None, limits=limits
            ) as sse,
        ):
            sid = (await http.post("/api/v1/sessions", json={})).json()["session_id"]
            path = f"/api/v1/sessions/{sid}"
            await latencies(http, path, 20)  # warm-up
            rows.append(("no stream open (baseline)", await latencies(http, path, samples)))
            opened = 0
            all_open = asyncio.Event()

            async def follow() -> None:
                nonlocal opened
                async with sse.stream("GET", f"{path}/events/stream") as response:
                    opened += 1
                    if opened == streams:
                        all_open.set()
                    async for _ in response.aiter_raw():
                        pass

            tasks = [asyncio.create_task(follow()) for _ in range(streams)]
            await asyncio.wait_for(all_open.wait(), 120)
            await asyncio.sleep(1)
            rows.append((f"{streams} SSE streams open", await latencies(http, path, samples)))
            client = aioredis.Redis.from_url(redis_server.url)
            publisher = EventPublisher(client, sid)
            await publisher.start()

            async def flow() -> None:
                while True:
                    publisher.emit("bench", '{"x":1}', source=EventSource.CLI, turn_id=None)
                    await asyncio.sleep(0.05)

            flowing = asyncio.create_task(flow())
            await asyncio.sleep(1)
            rows.append(
                (f"{streams} streams, 20 events/s to each", await latencies(http, path, samples))
            )
            flowing.cancel()
            await publisher.close(5)
            await client.aclose()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await http.delete(path)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            gateway.stop()
        model.stop()
        redis_server.stop()
    base50 = pct(rows[0][1], 50)
    print(f"\nGET /api/v1/sessions/{{id}}, {samples} sequential samples, milliseconds")
    print(f"{'condition':>38} {'p50':>7} {'p95':>7} {'p99':>7} {'p50 vs baseline':>16}")
    for name, values in rows:
        p50, p95, p99 = pct(values, 50), pct(values, 95), pct(values, 99)
        print(f"{name:>38} {p50:>7.2f} {p95:>7.2f} {p99:>7.2f} {p50 / base50:>15.2f}x")


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(run(args.streams, args.samples))


if __name__ == "__main__":
    main()
