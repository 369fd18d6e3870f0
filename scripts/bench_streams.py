"""API latency with many open streams: one gateway process, SQLite (the embedded default).

A real session (its container idle) on a ``ccgate serve`` process with real Redis; the streams
are read by a separate process, so the prober's own loop is idle. Measures
``GET /api/v1/sessions/{id}`` (authorization + one query) sequentially, p50/p95/p99:
first with no stream open (the baseline, same run), then with 1,000 Server-Sent-Events streams
open on the session, then with 1,000 streams while events flow to all of them (2 and 20
events/s, i.e. 2,000 and 20,000 deliveries/s).

Usage: .venv/bin/python scripts/bench_streams.py [--streams 1000] [--samples 300]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import resource
import secrets
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.auth import mint_token
from scripted_model import ScriptedModelServer
from tests.servers import GatewayProcess, RedisServer
from wrapper.protocol import EventSource
from wrapper.publisher import EventPublisher


def _readers(url: str, token: str, path: str, streams: int, ready: Any) -> None:
    """In a process of its own (so reading 1,000 streams does not slow the prober): open the
    SSE streams, set ``ready`` once all are open, read until terminated."""

    async def main() -> None:
        limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams)
        headers = {"Authorization": f"Bearer {token}"}
        opened = 0
        async with httpx.AsyncClient(
            base_url=url, headers=headers, timeout=None, limits=limits
        ) as sse:

            async def follow() -> None:
                nonlocal opened
                async with sse.stream("GET", f"{path}/events/stream") as response:
                    opened += 1
                    if opened == streams:
                        ready.set()
                    async for _ in response.aiter_raw():
                        pass

            await asyncio.gather(*(follow() for _ in range(streams)))

    asyncio.run(main())


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
            "anthropic_base_url": f"http://127.0.0.1:{model.port}",
            "anthropic_api_key": "sk-ant-bench",
            "rate_limit": "",  # throughput of one user is measured, not the limiter
        }
    ).start()
    token = mint_token(key=secret, user=f"bench-{uuid.uuid4().hex[:6]}", ttl_s=3600)
    headers = {"Authorization": f"Bearer {token}"}
    rows: list[tuple[str, list[float]]] = []
    try:
        async with (
            httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=60) as http,
        ):
            sid = (await http.post("/api/v1/sessions", json={})).json()["session_id"]
            path = f"/api/v1/sessions/{sid}"
            await latencies(http, path, 20)  # warm-up
            rows.append(("no stream open (baseline)", await latencies(http, path, samples)))
            ready = multiprocessing.Event()
            readers = multiprocessing.Process(
                target=_readers, args=(gateway.url, token, path, streams, ready), daemon=True
            )
            readers.start()
            assert await asyncio.to_thread(ready.wait, 120), "the streams did not open"
            await asyncio.sleep(1)
            rows.append((f"{streams} SSE streams open", await latencies(http, path, samples)))
            client = aioredis.Redis.from_url(redis_server.url)
            publisher = EventPublisher(client, sid)
            await publisher.start()

            for rate in (2, 20):

                async def flow(period: float = 1 / rate) -> None:
                    while True:
                        publisher.emit("bench", '{"x":1}', source=EventSource.CLI, turn_id=None)
                        await asyncio.sleep(period)

                flowing = asyncio.create_task(flow())
                await asyncio.sleep(1)
                name = f"{streams} streams, {rate} events/s to each"
                rows.append((name, await latencies(http, path, samples)))
                flowing.cancel()
            await publisher.close(5)
            await client.aclose()
            readers.terminate()
            readers.join(10)
            await http.delete(path)
    finally:
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
