"""Event relay benchmark: one gateway process fanning a session's events out to WebSocket clients.

Real Redis, PostgreSQL and a gateway process (``ccgate serve``); one real session (its container
idle). The wrapper's own EventPublisher appends events (1 KiB of data each) to that session; for
1, 10 and 100 WebSocket clients it measures

  throughput  a burst of N events: events per second each client receives (and in total)
  latency     events paced at 200/s: publish (envelope ``ts``) -> receive, p50 / p99

beside a baseline in the same run: a bare Redis pub/sub subscriber on the session's live channel
reading the same events. Prints the table and the ratios.

Usage: .venv/bin/python scripts/bench_events.py [--burst 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.auth import mint_token
from scripted_model import ScriptedModelServer
from tests.servers import GatewayProcess, PostgresServer, RedisServer
from wrapper.protocol import EventSource, live_channel
from wrapper.publisher import EventPublisher

_HEAD = re.compile(rb'^\{"seq":(\d+),.*?"ts":([0-9.]+),')
PACED_RATE = 200.0
PACED_SECONDS = 3.0


def _parse(raw: bytes) -> tuple[int, float]:
    match = _HEAD.match(raw[:300])
    assert match is not None
    return int(match.group(1)), float(match.group(2))


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))]


class Receiver:
    """Collects (receive time, seq, ts) until it has seen ``last_seq``."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int, float]] = []
        self.done = asyncio.Event()
        self.last_seq = 0

    def take(self, raw: bytes) -> None:
        seq, ts = _parse(raw)
        self.samples.append((time.time(), seq, ts))
        if self.last_seq and seq >= self.last_seq:
            self.done.set()


async def ws_reader(url: str, receiver: Receiver, ready: asyncio.Event) -> None:
    """A WebSocket client of the gateway."""
    async with connect(url, max_size=None) as ws:
        ready.set()
        async for message in ws:
            data = message.encode() if isinstance(message, str) else message
            if data.startswith(b'{"seq":'):
                receiver.take(data)


async def redis_reader(
    client: aioredis.Redis, sid: str, receiver: Receiver, ready: asyncio.Event
) -> None:
    """The baseline: a bare Redis subscriber on the session's live channel."""
    pubsub = client.pubsub()
    await pubsub.subscribe(live_channel(sid))
    ready.set()
    while True:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if message is not None:
            receiver.take(message["data"])


async def phase(
    publisher: EventPublisher, receivers: list[Receiver], count: int, rate: float | None
) -> float:
    """Publish ``count`` events (as fast as possible, or paced); wait for every receiver."""
    pad = json.dumps({"pad": "x" * 1000})
    for r in receivers:
        r.samples.clear()
        r.done.clear()
    start = time.time()
    first = publisher.last_seq + 1
    for r in receivers:
        r.last_seq = first + count - 1
    for n in range(count):
        publisher.emit("bench", pad, source=EventSource.CLI, turn_id=None)
        if rate is not None:
            await asyncio.sleep(max(0.0, start + (n + 1) / rate - time.time()))
        elif n % 200 == 0:
            await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in receivers)), 120)
    return start


async def run(burst: int) -> None:
    """Everything, printed as a table."""
    secret = secrets.token_urlsafe(32)
    tmp = Path(tempfile.mkdtemp(prefix="ccgate-bench-events-"))
    redis_server = RedisServer().start()
    postgres = PostgresServer().start()
    model = ScriptedModelServer().start()
    gateway = GatewayProcess(
        {
            "data_dir": tmp,
            "jwt_secret": secret,
            "database_url": postgres.url,
            "redis_url": redis_server.url,
            "anthropic_base_url": f"http://127.0.0.1:{model.port}",
            "anthropic_api_key": "sk-ant-bench",
            "rate_limit": "",  # throughput of one user is measured, not the limiter
            "stream_maxlen": 100_000,
        }
    ).start()
    token = mint_token(key=secret, user=f"bench-{uuid.uuid4().hex[:6]}", ttl_s=3600)
    rows = []
    try:
        async with httpx.AsyncClient(
            base_url=gateway.url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as http:
            sid = (await http.post("/api/v1/sessions", json={})).json()["session_id"]
            client = aioredis.Redis.from_url(redis_server.url)
            publisher = EventPublisher(client, sid)
            await publisher.start()
            for n_clients in (1, 10, 100):
                baseline = Receiver()
                clients = [Receiver() for _ in range(n_clients)]
                readies = [asyncio.Event() for _ in range(n_clients + 1)]
                last = publisher.last_seq
                url = (
                    f"{gateway.ws_url}/api/v1/sessions/{sid}/stream?after_seq={last}&token={token}"
                )
                tasks = [asyncio.create_task(redis_reader(client, sid, baseline, readies[0]))]
                tasks += [
                    asyncio.create_task(ws_reader(url, r, e))
                    for r, e in zip(clients, readies[1:], strict=True)
                ]
                await asyncio.gather(*(e.wait() for e in readies))
                await asyncio.sleep(0.5)
                everyone = [baseline, *clients]
                start = await phase(publisher, everyone, burst, None)

                def rate(r: Receiver, t0: float = start) -> float:
                    return len(r.samples) / (r.samples[-1][0] - t0)

                per_client = sorted(rate(r) for r in clients)[len(clients) // 2]
                base_rate = rate(baseline)
                await phase(publisher, everyone, int(PACED_RATE * PACED_SECONDS), PACED_RATE)
                lat = [(t - ts) * 1000 for r in clients for t, _, ts in r.samples]
                base_lat = [(t - ts) * 1000 for t, _, ts in baseline.samples]
                latencies = (pct(lat, 50), pct(lat, 99), pct(base_lat, 50), pct(base_lat, 99))
                rows.append((n_clients, per_client, per_client * n_clients, base_rate, *latencies))
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            await publisher.close(5)
            await client.aclose()
            await http.delete(f"/api/v1/sessions/{sid}")
    finally:
        gateway.stop()
        model.stop()
        postgres.stop()
        redis_server.stop()
    print(f"\nburst of {burst} events of ~1.1 KiB; latency at {PACED_RATE:.0f} events/s")
    print(
        f"{'clients':>7} {'ev/s per client':>16} {'deliveries/s':>13} {'baseline ev/s':>14} "
        f"{'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} {'base p50':>9} {'base p99':>9}"
    )
    for n, per, total, base, p50, p99, b50, b99 in rows:
        print(
            f"{n:>7} {per:>16.0f} {total:>13.0f} {base:>14.0f} {per / base:>6.2f} "
            f"{p50:>7.2f} {p99:>7.2f} {b50:>9.2f} {b99:>9.2f}"
        )


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--burst", type=int, default=5000)
    asyncio.run(run(parser.parse_args().burst))


if __name__ == "__main__":
    main()
