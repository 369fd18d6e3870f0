"""The ledger turns lifecycle events into database state, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.config import Settings
from gateway.db.engine import make_db_factory, make_engine
from gateway.db.migrate import migrate
from gateway.db.models import DeadLetter, Event, Session, SessionStatus, Turn, TurnStatus
from gateway.metrics import Metrics
from gateway.services.artifacts import LocalArtifactStore
from gateway.services.envelopes import notice_key, sign_notice
from gateway.services.history import read_page
from gateway.services.ledger import Ledger
from gateway.services.runtime.docker import DockerRuntime
from gateway.services.session_redis import ensure_ledger_group
from gateway.services.shutdown import delete_rows
from gateway.supervisor import Supervisor
from tests.containers import PostgresContainer, RedisContainer
from wrapper.protocol import ENVELOPE_FIELD, LEDGER_GROUP, EventSource, events_key
from wrapper.publisher import EventPublisher


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_server: PostgresContainer
) -> AsyncIterator[AsyncEngine]:
    # A database of its own: the session-scoped e2e gateway's ledger, on the shared one, would
    # otherwise track these sessions too and consume their entries with its own settings.
    url = (
        f"sqlite+aiosqlite:///{tmp_path}/ledger.db"
        if request.param == "sqlite"
        else postgres_server.new_database()
    )
    eng = make_engine(url)
    await migrate(eng)
    yield eng
    await eng.dispose()


LedgerFactory = Callable[..., Awaitable[Ledger]]


@pytest.fixture
async def make_ledger(
    engine: AsyncEngine, redis_server: RedisContainer, tmp_path: Path
) -> AsyncIterator[LedgerFactory]:
    """Started ledgers (each with its own supervisor), closed after the test."""
    made: list[tuple[Ledger, Supervisor, aioredis.Redis]] = []

    async def _make(*sids: str, **settings: Any) -> Ledger:
        client = aioredis.Redis.from_url(redis_server.url)
        supervisor = Supervisor()
        ledger = Ledger(
            settings=Settings(data_dir=tmp_path, **settings),
            redis=client,
            db_factory=make_db_factory(engine),
            runtime=DockerRuntime(),
            store=LocalArtifactStore(tmp_path / "artifacts"),
            metrics=Metrics(),
            supervisor=supervisor,
            max_attempts=3,
        )
        for sid in sids:
            ledger.track(sid)
        await ledger.start()
        made.append((ledger, supervisor, client))
        return ledger

    yield _make
    for ledger, supervisor, client in made:
        await supervisor.close()
        await ledger.close()
        await client.aclose()


async def _wait_for(check: Callable[[], Awaitable[bool]], timeout_s: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def _session(db_factory: async_sessionmaker[AsyncSession], *turns: str) -> str:
    sid = str(uuid.uuid4())
    async with db_factory() as db:
        db.add(Session(id=sid, owner="u", workspace_volume="v", root_id=sid))
        await db.commit()
        for mid in turns:
            db.add(Turn(id=mid, session_id=sid, prompt=mid))
        await db.commit()
    return sid


async def _event_count(db_factory: async_sessionmaker[AsyncSession], sid: str) -> int:
    async with db_factory() as db:
        return int((await db.exec(select(func.count()).where(Event.session_id == sid))).one())


def _completed(mid: str, total: float, usage: int) -> dict[str, Any]:
    return {
        "message_id": mid,
        "subtype": "success",
        "is_error": False,
        "result": f"done {mid}",
        "terminal_reason": "completed",
        "usage": {"input_tokens": usage, "output_tokens": 1},
        "total_cost_usd": total,
        "num_turns": 1,
        "duration_ms": 5,
        "files": [],
    }


async def test_turn_results_and_status_are_recorded_once_and_reported_costs_ignored(
    engine: AsyncEngine, redis_server: RedisContainer, make_ledger: LedgerFactory
) -> None:
    db_factory = make_db_factory(engine)
    client = aioredis.Redis.from_url(redis_server.url)
    mid1, mid2 = str(uuid.uuid4()), str(uuid.uuid4())
    sid = await _session(db_factory, mid1, mid2)
    await ensure_ledger_group(client, sid)
    publisher = EventPublisher(client, sid)
    await publisher.start()

    def wrapper(kind: str, data: dict[str, Any], turn: str | None) -> None:
        publisher.emit(kind, json.dumps(data), source=EventSource.WRAPPER, turn_id=turn)

    wrapper("ready", {"cli_session_id": sid}, None)
    for mid, total, usage in ((mid1, 0.25, 100), (mid2, 0.75, 50)):
        wrapper("turn_started", {"message_id": mid}, mid)
        publisher.emit(
            "result", json.dumps({"type": "result"}), source=EventSource.CLI, turn_id=mid
        )
        wrapper("turn_completed", _completed(mid, total, usage), mid)
    await publisher.flush(5)
    await make_ledger(sid)

    async def both_done() -> bool:
        async with db_factory() as db:
            turn = await db.get(Turn, mid2)
            return turn is not None and turn.status is TurnStatus.COMPLETED

    await _wait_for(both_done)
    async with db_factory() as db:
        session = await db.get(Session, sid)
        assert session is not None
        assert session.status is SessionStatus.IDLE
        assert session.total_turns == 2
        # The CLI's own cost and usage (made inside the sandbox) are never trusted: only the
        # model proxy's metering sets them, and no request went through it here.
        assert session.total_cost_usd == 0
        assert session.usage == {}
        first = await db.get(Turn, mid1)
        second = await db.get(Turn, mid2)
        assert first is not None and second is not None
        assert first.cost_usd is None and second.cost_usd is None
        assert first.usage is None and second.total_cost_usd == 0
        assert second.result == f"done {mid2}"
        assert second.recorded_at is not None  # no files: recorded with the result
    await _wait_for(lambda: _equal(_event_count(db_factory, sid), 7))
    await publisher.close(1)
    await client.aclose()


async def _equal(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def test_two_ledgers_in_one_process_share_the_work_without_double_applying(
    engine: AsyncEngine, redis_server: RedisContainer, make_ledger: LedgerFactory
) -> None:
    db_factory = make_db_factory(engine)
    client = aioredis.Redis.from_url(redis_server.url)
    sid = await _session(db_factory)
    await ensure_ledger_group(client, sid)
    publisher = EventPublisher(client, sid)
    await publisher.start()
    for _ in range(2):
        await make_ledger(sid)
    for n in range(300):
        publisher.emit("assistant", json.dumps({"n": n}), source=EventSource.CLI, turn_id=None)
    await publisher.flush(10)
    await _wait_for(lambda: _equal(_event_count(db_factory, sid), 300), timeout_s=20)
    async with db_factory() as db:
        letters = (await db.exec(select(DeadLetter).where(DeadLetter.session_id == sid))).all()
    assert letters == []
    await publisher.close(1)
    await client.aclose()


async def test_an_entry_a_dead_replica_left_pending_is_taken_over_and_persisted(
    engine: AsyncEngine, redis_server: RedisContainer, make_ledger: LedgerFactory
) -> None:
    """Exactly one unacknowledged entry (the XAUTOCLAIM justid reply shape that crashed)."""
    db_factory = make_db_factory(engine)
    client = aioredis.Redis.from_url(redis_server.url)
    mid = str(uuid.uuid4())
    sid = await _session(db_factory, mid)
    await ensure_ledger_group(client, sid)
    publisher = EventPublisher(client, sid)
    await publisher.start()
    publisher.emit(
        "turn_completed",
        json.dumps(_completed(mid, 0.5, 10)),
        source=EventSource.WRAPPER,
        turn_id=mid,
    )
    await publisher.flush(5)
    # A replica reads the entry and dies before acknowledging it.
    read = await client.xreadgroup(LEDGER_GROUP, "dead-replica", {events_key(sid): ">"})
    assert len(read[0][1]) == 1
    await make_ledger(sid, ledger_claim_idle_s=0.3)

    async def recorded() -> bool:
        async with db_factory() as db:
            turn = await db.get(Turn, mid)
            return turn is not None and turn.status is TurnStatus.COMPLETED

    await _wait_for(recorded)
    page = await read_page(
        db_factory=db_factory, redis=client, session_id=sid, after_seq=0, limit=10
    )
    assert [e["seq"] for e in page.events] == [1]
    summary = await client.xpending(events_key(sid), LEDGER_GROUP)
    assert summary["pending"] == 0
    await publisher.close(1)
    await client.aclose()


async def test_a_poison_entry_is_dead_lettered_and_other_sessions_go_on(
    engine: AsyncEngine, redis_server: RedisContainer, make_ledger: LedgerFactory
) -> None:
    db_factory = make_db_factory(engine)
    client = aioredis.Redis.from_url(redis_server.url)
    mid = str(uuid.uuid4())
    poisoned = await _session(db_factory, mid)
    healthy = await _session(db_factory)
    for sid in (poisoned, healthy):
        await ensure_ledger_group(client, sid)
    bad = EventPublisher(client, poisoned)
    good = EventPublisher(client, healthy)
    for publisher in (bad, good):
        await publisher.start()
    # Well-formed JSON the applier cannot apply ("files" must be a list), and garbage.
    bad.emit(
        "turn_completed",
        json.dumps({**_completed(mid, 0.1, 1), "files": 5}),
        source=EventSource.WRAPPER,
        turn_id=mid,
    )
    await bad.close(5)
    await client.xadd(events_key(poisoned), {"e": b"\xff not json"}, id="2-0")
    bad = EventPublisher(client, poisoned)  # continues after the stream's last seq
    await bad.start()
    bad.emit("assistant", json.dumps({"after": True}), source=EventSource.CLI, turn_id=None)
    await bad.flush(5)
    for n in range(50):
        good.emit("assistant", json.dumps({"n": n}), source=EventSource.CLI, turn_id=None)
    await good.flush(5)
    await make_ledger(poisoned, healthy)
    await _wait_for(lambda: _equal(_event_count(db_factory, healthy), 50))

    async def two_letters() -> bool:
        async with db_factory() as db:
            rows = (
                await db.exec(select(DeadLetter).where(DeadLetter.session_id == poisoned))
            ).all()
        return len(rows) == 2

    await _wait_for(two_letters, timeout_s=20)
    async with db_factory() as db:
        rows = (
            await db.exec(
                select(DeadLetter)
                .where(DeadLetter.session_id == poisoned)
                .order_by(DeadLetter.entry_id)  # type: ignore[arg-type]
            )
        ).all()
    assert rows[0].entry_id == "1-0" and "apply" in rows[0].reason and rows[0].attempts == 3
    assert rows[1].entry_id == "2-0" and rows[1].attempts == 1
    # The event after the poison is persisted, and the poison's seq is never skipped silently:
    # seq 1 is persisted as an event (its apply failed), seq 2 is reported as a gap.
    await _wait_for(lambda: _equal(_event_count(db_factory, poisoned), 2))
    await client.xtrim(events_key(poisoned), maxlen=0)
    page = await read_page(
        db_factory=db_factory, redis=client, session_id=poisoned, after_seq=0, limit=10
    )
    assert [(e.get("seq"), e["type"]) for e in page.events] == [
        (1, "turn_completed"),
        (None, "gap"),
        (3, "assistant"),
    ]
    for publisher in (bad, good):
        await publisher.close(1)
    await client.aclose()


async def test_a_burst_past_the_stream_cap_reaches_the_history_complete(
    engine: AsyncEngine, redis_server: RedisContainer, make_ledger: LedgerFactory
) -> None:
    """15,000 events with a 50-event stream cap: nothing is trimmed before it is persisted."""
    db_factory = make_db_factory(engine)
    client = aioredis.Redis.from_url(redis_server.url)
    sid = await _session(db_factory)
    await ensure_ledger_group(client, sid)
    publisher = EventPublisher(client, sid)
    await publisher.start()
    await make_ledger(sid, stream_maxlen=50)
    total = 15_000
    for n in range(total):
        publisher.emit(
            "stream_event", json.dumps({"delta": n}), source=EventSource.CLI, turn_id=None
        )
    await publisher.flush(60)
    await _wait_for(lambda: _equal(_event_count(db_factory, sid), total), timeout_s=120)
    seqs: list[int] = []
    after = 0
    while True:
        page = await read_page(
            db_factory=db_factory, redis=client, session_id=sid, after_seq=after, limit=1000
        )
        assert all(e["type"] != "gap" for e in page.events)
        seqs += [e["seq"] for e in page.events]
        after = page.next_after_seq
        if not page.has_more:
            break
    assert seqs == list(range(1, total + 1))
    await asyncio.sleep(1.2)  # the next trim pass
    publisher.emit("stream_event", "{}", source=EventSource.CLI, turn_id=None)
    await publisher.flush(5)
    await _wait_for(lambda: _stream_shorter(client, sid, 1000), timeout_s=10)
    await publisher.close(1)
    await client.aclose()


async def _stream_shorter(client: aioredis.Redis, sid: str, limit: int) -> bool:
    return int(await client.xlen(events_key(sid))) < limit


async def test_a_stream_deleted_under_the_ledger_does_not_crash_it(
    engine: AsyncEngine, redis_server: RedisContainer, make_ledger: LedgerFactory
) -> None:
    """A session being deleted: its keys go first, its row a moment later."""
    db_factory = make_db_factory(engine)
    client = aioredis.Redis.from_url(redis_server.url)
    sid = await _session(db_factory)
    await ensure_ledger_group(client, sid)
    publisher = EventPublisher(client, sid)
    await publisher.start()
    ledger = await make_ledger(sid)
    for batch in (1, 2):  # the second batch lands within a second of the first trim pass
        for n in range(5):
            publisher.emit("assistant", json.dumps({"n": n}), source=EventSource.CLI, turn_id=None)
        await publisher.flush(5)
        await _wait_for(lambda b=batch: _equal(_event_count(db_factory, sid), 5 * b))
    await publisher.close(1)
    await client.delete(events_key(sid))  # before the idle trim of the second batch
    await asyncio.sleep(4.5)  # two refresh passes (trim, claim, read) over the missing stream
    state = ledger._supervisor.states["ledger"]
    assert state.restarts == 0, state.last_error
    await client.aclose()


async def test_replicas_trim_by_the_groups_watermark_not_their_own_acks(
    engine: AsyncEngine, redis_server: RedisContainer, make_ledger: LedgerFactory
) -> None:
    """Two replicas share a session's entries; the stream still shrinks to the cap once all
    of them are persisted, whichever replica acknowledged the newest."""
    db_factory = make_db_factory(engine)
    client = aioredis.Redis.from_url(redis_server.url)
    sid = await _session(db_factory)
    await ensure_ledger_group(client, sid)
    publisher = EventPublisher(client, sid)
    await publisher.start()
    await make_ledger(sid, stream_maxlen=10)
    await make_ledger(sid, stream_maxlen=10_000)  # acknowledges, but would keep everything
    for burst in range(1, 4):
        for n in range(100):
            publisher.emit("x", json.dumps({"n": n}), source=EventSource.CLI, turn_id=None)
        await publisher.flush(5)
        await _wait_for(lambda b=burst: _equal(_event_count(db_factory, sid), 100 * b))
    await _wait_for(lambda: _stream_at_most(client, sid, 10), timeout_s=10)
    await publisher.close(1)
    await client.aclose()


async def _stream_at_most(client: aioredis.Redis, sid: str, limit: int) -> bool:
    return int(await client.xlen(events_key(sid))) <= limit


async def test_events_of_a_session_deleted_meanwhile_are_dropped_without_an_error(
    engine: AsyncEngine,
) -> None:
    """Delete racing the persister: no foreign-key error, no orphan rows, the batch's other
    sessions are written."""
    from gateway.services.ledger.persister import parse_entry, persist_events
    from wrapper.protocol import encode_envelope

    db_factory = make_db_factory(engine)
    for _ in range(20):
        gone, kept = await _session(db_factory), await _session(db_factory)

        def entries(sid: str) -> list[Any]:
            return [
                parse_entry(
                    sid,
                    f"{seq}-0",
                    encode_envelope(
                        seq=seq,
                        session_id=sid,
                        turn_id=None,
                        event_type="x",
                        data_json="{}",
                        source=EventSource.CLI,
                    ).encode(),
                )
                for seq in range(1, 51)
            ]

        async def delete_gone(sid: str = gone) -> None:
            async with db_factory() as db:  # the database part of SessionService.delete
                row = await db.get(Session, sid)
                assert row is not None
                await delete_rows(db, row)
                await db.commit()

        await asyncio.gather(
            persist_events(db_factory, entries(gone) + entries(kept)), delete_gone()
        )
        assert await _event_count(db_factory, kept) == 50
        assert await _event_count(db_factory, gone) == 0  # no orphan, whatever the order


async def test_forged_envelopes_are_dead_lettered_with_the_reason_and_never_persisted(
    engine: AsyncEngine, redis_server: RedisContainer, make_ledger: LedgerFactory
) -> None:
    """What a container could write into its own stream: a wrapper event typed as a gateway
    one, an unsigned gateway event, a CLI line typed as a lifecycle event, an envelope naming
    another session. Only the genuine events (a CLI line, a gateway event signed with the
    gateway's key) are persisted; nothing forged changes the session."""
    db_factory = make_db_factory(engine)
    client = aioredis.Redis.from_url(redis_server.url)
    mid = str(uuid.uuid4())
    sid, other = await _session(db_factory, mid), await _session(db_factory)
    await ensure_ledger_group(client, sid)
    secret = "ledger-test-secret-" + "x" * 32
    publisher = EventPublisher(client, sid)
    await publisher.start()
    child = {"child_session_id": other, "message_id": mid, "status": "completed"}
    signed = sign_notice(notice_key(secret), sid, "child_result", child)
    publisher.emit(
        "assistant", json.dumps({"type": "assistant"}), source=EventSource.CLI, turn_id=None
    )
    publisher.emit("child_result", json.dumps(child), source=EventSource.WRAPPER, turn_id=None)
    publisher.emit("child_result", json.dumps(child), source=EventSource.GATEWAY, turn_id=None)
    publisher.emit("child_result", json.dumps(signed), source=EventSource.GATEWAY, turn_id=None)
    forged_done = {"message_id": mid, "is_error": False, "result": "forged", "files": []}
    publisher.emit("turn_completed", json.dumps(forged_done), source=EventSource.CLI, turn_id=mid)
    await publisher.flush(5)
    foreign = {"seq": 6, "session_id": other, "turn_id": None, "ts": 0, "type": "ready",
               "source": "wrapper", "data": {"cli_session_id": "x"}}  # fmt: skip
    await client.xadd(events_key(sid), {ENVELOPE_FIELD: json.dumps(foreign)}, id="6-0")
    await make_ledger(sid, jwt_secret=secret)
    await _wait_for(lambda: _equal(_letters(db_factory, sid), 4))
    async with db_factory() as db:
        reasons = sorted(
            d.reason
            for d in (await db.exec(select(DeadLetter).where(DeadLetter.session_id == sid)))
        )
        kept = (await db.exec(select(Event.seq).where(Event.session_id == sid))).all()
        turn = await db.get(Turn, mid)
        other_session = await db.get(Session, other)
    assert sorted(kept) == [1, 4]
    assert all(r.startswith("forged") for r in reasons), reasons
    assert any("names session" in r for r in reasons)
    assert any("signature" in r for r in reasons)
    assert turn is not None and turn.status is TurnStatus.QUEUED and turn.result is None
    assert other_session is not None and other_session.cli_session_id is None
    await publisher.close(1)
    await client.aclose()


async def _letters(db_factory: async_sessionmaker[AsyncSession], sid: str) -> int:
    async with db_factory() as db:
        rows = await db.exec(select(func.count()).where(DeadLetter.session_id == sid))
        return int(rows.one())
