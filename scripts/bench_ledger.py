"""Ledger benchmark: how fast events reach the database, and the lag during a burst.

Real Redis, and SQLite (a file) and PostgreSQL in turn. For each database:

  throughput  N events already in one session's stream; a Ledger starts and persists them all.
              Events per second, beside the baseline of the previous ledger's method measured in
              the same run: one INSERT and one commit per event (same rows, same database).
  burst       5 sessions, each publishing M events as fast as the wrapper's publisher can; the
              ledger runs meanwhile. Peak lag (entries not yet persisted, all sessions) sampled
              every 50 ms, and the time from the last publish to the last event persisted.

Usage: .venv/bin/python scripts/bench_ledger.py [--events 20000] [--burst 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import func, select
from sqlmodel.ext.asyncio.session import AsyncSession

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.config import Settings
from gateway.db.engine import make_db_factory, make_engine
from gateway.db.migrate import migrate
from gateway.db.models import Event, Session
from gateway.metrics import Metrics
from gateway.services.artifacts import LocalArtifactStore
from gateway.services.ledger import Ledger
from gateway.services.runtime.docker import DockerRuntime
from gateway.services.session_redis import ensure_ledger_group
from gateway.supervisor import Supervisor
from tests.servers import PostgresServer, RedisServer
from wrapper.protocol import EventSource, encode_envelope
from wrapper.publisher import EventPublisher

DATA = json.dumps({"type": "stream_event", "event": {"delta": {"text": "x" * 200}}})


async def _sessions(db_factory: async_sessionmaker[AsyncSession], n: int) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    async with db_factory() as db:
        for sid in ids:
            db.add(Session(id=sid, owner="bench", workspace_volume="v", root_id=sid))
        await db.commit()
    return ids


async def _count(db_factory: async_sessionmaker[AsyncSession], sids: list[str]) -> int:
    async with db_factory() as db:
        query = select(func.count()).select_from(Event).where(Event.session_id.in_(sids))  # type: ignore[attr-defined]
        return int((await db.exec(query)).one())


async def _until_persisted(
    db_factory: async_sessionmaker[AsyncSession], sids: list[str], n: int
) -> None:
    """Poll the events table every 20 ms (the measurement's resolution) until n rows."""
    while True:
        if await _count(db_factory, sids) >= n:
            return
        await asyncio.sleep(0.02)


def _ledger(
    settings: Settings,
    client: aioredis.Redis,
    db_factory: async_sessionmaker[AsyncSession],
    tmp: Path,
) -> tuple[Ledger, Supervisor]:
    supervisor = Supervisor()
    ledger = Ledger(
        settings=settings,
        redis=client,
        db_factory=db_factory,
        runtime=DockerRuntime(),
        store=LocalArtifactStore(tmp / "artifacts"),
        metrics=Metrics(),
        supervisor=supervisor,
    )
    return ledger, supervisor


async def baseline(db_factory: async_sessionmaker[AsyncSession], n: int) -> float:
    """The previous ledger's method: one transaction per event. Events per second."""
    (sid,) = await _sessions(db_factory, 1)
    started = time.perf_counter()
    for seq in range(1, n + 1):
        raw = encode_envelope(
            seq=seq, session_id=sid, turn_id=None, event_type="stream_event",
            data_json=DATA, source=EventSource.CLI,
        )  # fmt: skip
        async with db_factory() as db:
            if await db.get(Event, (sid, seq)) is None:
                db.add(Event(session_id=sid, seq=seq, turn_id=None, type="stream_event",
                             envelope=raw))  # fmt: skip
                await db.commit()
    return n / (time.perf_counter() - started)


async def throughput(engine: AsyncEngine, redis_url: str, n: int, tmp: Path) -> float:
    """The ledger persisting n events already in the stream. Events per second."""
    db_factory = make_db_factory(engine)
    client = aioredis.Redis.from_url(redis_url)
    (sid,) = await _sessions(db_factory, 1)
    await ensure_ledger_group(client, sid)
    publisher = EventPublisher(client, sid, max_pending=n + 1)
    await publisher.start()
    for _ in range(n):
        publisher.emit("stream_event", DATA, source=EventSource.CLI, turn_id=None)
    await publisher.flush(120)
    ledger, supervisor = _ledger(Settings(data_dir=tmp), client, db_factory, tmp)
    started = time.perf_counter()
    ledger.track(sid)
    await ledger.start()
    await _until_persisted(db_factory, [sid], n)
    elapsed = time.perf_counter() - started
    await supervisor.close()
    await publisher.close(1)
    await client.aclose()
    return n / elapsed


async def burst(engine: AsyncEngine, redis_url: str, m: int, tmp: Path) -> tuple[int, float]:
    """5 sessions publishing m events each while the ledger runs: (peak lag, drain seconds)."""
    db_factory = make_db_factory(engine)
    client = aioredis.Redis.from_url(redis_url)
    sids = await _sessions(db_factory, 5)
    for sid in sids:
        await ensure_ledger_group(client, sid)
    ledger, supervisor = _ledger(Settings(data_dir=tmp), client, db_factory, tmp)
    for sid in sids:
        ledger.track(sid)
    await ledger.start()
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sum((await ledger.lag()).values()))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    publishers = [EventPublisher(client, sid, max_pending=m + 1) for sid in sids]
    for p in publishers:
        await p.start()
    for _ in range(m):
        for p in publishers:
            p.emit("stream_event", DATA, source=EventSource.CLI, turn_id=None)
    for p in publishers:
        await p.flush(120)
    published = time.perf_counter()
    await _until_persisted(db_factory, sids, 5 * m)
    drain = time.perf_counter() - published
    done.set()
    await sampler
    await supervisor.close()
    for p in publishers:
        await p.close(1)
    await client.aclose()
    return peak, drain


async def run(n: int, m: int) -> None:
    """Both databases, both measures; prints the table."""
    tmp = Path(tempfile.mkdtemp(prefix="ccgate-bench-ledger-"))
    redis_server = RedisServer().start()
    postgres = PostgresServer().start()
    rows = []
    try:
        for name, url in (
            ("sqlite", f"sqlite+aiosqlite:///{tmp}/bench.db"),
            ("postgresql", postgres.url),
        ):
            engine = make_engine(url)
            await migrate(engine)
            base = await baseline(make_db_factory(engine), n // 4)
            rate = await throughput(engine, redis_server.url, n, tmp)
            peak, drain = await burst(engine, redis_server.url, m, tmp)
            rows.append((name, base, rate, peak, drain))
            await engine.dispose()
    finally:
        postgres.stop()
        redis_server.stop()
    print(f"\n{n} events for throughput; burst: 5 sessions x {m} events (~300 B each)")
    print(f"{'database':>10} {'baseline ev/s':>14} {'ledger ev/s':>12} {'ratio':>6} "
          f"{'burst peak lag':>15} {'drain s':>8}")  # fmt: skip
    for name, base, rate, peak, drain in rows:
        print(f"{name:>10} {base:>14.0f} {rate:>12.0f} {rate / base:>6.1f} {peak:>15} "
              f"{drain:>8.2f}")  # fmt: skip


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--burst", type=int, default=5_000)
    args = parser.parse_args()
    asyncio.run(run(args.events, args.burst))


if __name__ == "__main__":
    main()
