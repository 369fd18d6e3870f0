"""Races between chat, spawn and stop, on SQLite and PostgreSQL (real Redis, real database)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import select

from gateway.db.engine import make_db_factory, make_engine
from gateway.db.migrate import migrate
from gateway.db.models import Session, SessionStatus, SpawnTree, Turn, TurnStatus
from gateway.errors import Conflict
from gateway.metrics import Metrics
from gateway.services import tree
from gateway.services.artifacts import LocalArtifactStore
from gateway.services.event_hub import EventHub
from gateway.services.ledger import Ledger
from gateway.services.runtime.docker import DockerRuntime
from gateway.services.sessions import SessionService
from gateway.supervisor import Supervisor
from tests.conftest import JWT_SECRET, make_settings
from tests.containers import PostgresContainer, RedisContainer
from wrapper.protocol import TurnRequest, input_key


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_server: PostgresContainer
) -> AsyncIterator[AsyncEngine]:
    # A database of its own: the reaper here fails any live session it sees without a container.
    url = (
        f"sqlite+aiosqlite:///{tmp_path}/races.db"
        if request.param == "sqlite"
        else postgres_server.new_database()
    )
    eng = make_engine(url)
    await migrate(eng)
    yield eng
    await eng.dispose()


@pytest.fixture
async def service(
    engine: AsyncEngine, redis_server: RedisContainer, tmp_path: Path
) -> AsyncIterator[SessionService]:
    """A SessionService on real Redis and the database; sessions here have no container."""
    settings = make_settings(tmp_path, redis_url=redis_server.url, stop_record_timeout_s=0.1)
    client = aioredis.Redis.from_url(redis_server.url)
    db_factory = make_db_factory(engine)
    runtime = DockerRuntime()
    store = LocalArtifactStore(tmp_path / "a")
    metrics, supervisor = Metrics(), Supervisor()
    hub = EventHub(client)
    yield SessionService(
        settings=settings,
        redis=client,
        runtime=runtime,
        store=store,
        hub=hub,
        jwt_key=JWT_SECRET,
        db_factory=db_factory,
        ledger=Ledger(
            settings=settings,
            redis=client,
            db_factory=db_factory,
            runtime=runtime,
            store=store,
            metrics=metrics,
            supervisor=supervisor,
        ),
        metrics=metrics,
    )
    await client.aclose()


async def _live_session(service: SessionService, parent: Session | None = None) -> Session:
    sid = str(uuid.uuid4())
    session = Session(
        id=sid,
        owner="alice",
        status=SessionStatus.IDLE,
        workspace_volume="v",
        root_id=parent.root_id if parent else sid,
        parent_session_id=parent.id if parent else None,
        depth=parent.depth + 1 if parent else 0,
    )
    async with service.db_factory() as db:
        if parent is None:
            db.add(SpawnTree(root_id=sid, owner="alice"))
        db.add(session)
        await db.commit()
    return session


async def _chat_like_the_route(service: SessionService, session: Session) -> Turn:
    """The chat route's order: the owner's one-statement path (PostgreSQL), else the whole
    way (which raises why it refuses)."""
    async with service.db_factory() as db:
        quick = await service.chat_as_owner(
            db=db, owner=session.owner, session_id=session.id, prompt="hi", timeout_s=None
        )
        if quick is not None:
            return quick
        return await service.chat(db=db, session=session, prompt="hi", timeout_s=None)


@pytest.mark.parametrize("way", ["whole", "route"])
async def test_chat_racing_stop_never_leaves_a_turn_queued(
    service: SessionService, way: str
) -> None:
    for _ in range(15):
        session = await _live_session(service)

        async def chat(s: Session = session) -> Turn | None:
            try:
                if way == "route":
                    return await _chat_like_the_route(service, s)
                async with service.db_factory() as db:
                    return await service.chat(db=db, session=s, prompt="hi", timeout_s=None)
            except Conflict:
                return None

        async def stop(s: Session = session) -> None:
            async with service.db_factory() as db:
                await service.stop(db=db, session=s)

        await asyncio.gather(*(chat() for _ in range(3)), stop())
        async with service.db_factory() as db:
            turns = (await db.exec(select(Turn).where(Turn.session_id == session.id))).all()
            current = await db.get(Session, session.id)
        assert current is not None and current.status is SessionStatus.STOPPED
        assert all(t.status is TurnStatus.CANCELLED for t in turns), [t.status for t in turns]
        assert all(t.recorded_at is not None for t in turns)


async def test_the_owners_prompt_in_one_statement(
    service: SessionService, engine: AsyncEngine
) -> None:
    """On PostgreSQL the owner's prompt is queued by one statement: the turn with its deadline,
    the session touched, the prompt pushed to the session's input. Another user's, an ended
    session's, or a prompt over the user's limit is not taken (None) and writes nothing."""
    session = await _live_session(service)
    async with service.db_factory() as db:
        before = await db.get(Session, session.id)
        assert before is not None
        turn = await service.chat_as_owner(
            db=db, owner="alice", session_id=session.id, prompt="hello", timeout_s=12.5
        )
    if engine.dialect.name == "sqlite":
        assert turn is None  # SQLite has no data-modifying CTEs: the whole way, always
        return
    assert turn is not None
    async with service.db_factory() as db:
        row = await db.get(Turn, turn.id)
        touched = await db.get(Session, session.id)
    assert row is not None and row.status is TurnStatus.QUEUED
    assert (row.prompt, row.timeout_s, row.session_id) == ("hello", 12.5, session.id)
    assert touched is not None and touched.last_activity > before.last_activity
    pushed = await service.redis.lrange(input_key(session.id), 0, -1)
    assert [TurnRequest.from_json(p).message_id for p in pushed] == [turn.id]

    async def turns_of(sid: str) -> int:
        async with service.db_factory() as db:
            return len((await db.exec(select(Turn).where(Turn.session_id == sid))).all())

    async with service.db_factory() as db:
        assert (
            await service.chat_as_owner(
                db=db, owner="mallory", session_id=session.id, prompt="x", timeout_s=None
            )
            is None
        )
        assert (
            await service.chat_as_owner(
                db=db, owner="alice", session_id="no-such-session", prompt="x", timeout_s=None
            )
            is None
        )
    assert await turns_of(session.id) == 1
    limited = dataclasses.replace(
        service, settings=service.settings.model_copy(update={"max_active_turns_per_user": 1})
    )
    async with service.db_factory() as db:
        assert (
            await limited.chat_as_owner(
                db=db, owner="alice", session_id=session.id, prompt="x", timeout_s=None
            )
            is None
        )
    assert await turns_of(session.id) == 1
    async with service.db_factory() as db:
        await service.stop(db=db, session=session)
        assert (
            await service.chat_as_owner(
                db=db, owner="alice", session_id=session.id, prompt="x", timeout_s=None
            )
            is None
        )
        with pytest.raises(Conflict, match="stopped"):
            await _chat_like_the_route(service, session)


async def test_chat_on_a_stopped_session_is_refused(service: SessionService) -> None:
    session = await _live_session(service)
    async with service.db_factory() as db:
        await service.stop(db=db, session=session)
    async with service.db_factory() as db:
        with pytest.raises(Conflict, match="stopped"):
            await service.chat(db=db, session=session, prompt="hi", timeout_s=None)


async def test_a_child_cannot_be_admitted_under_a_parent_that_has_ended(
    service: SessionService,
) -> None:
    parent = await _live_session(service)
    async with service.db_factory() as db:
        await service.stop(db=db, session=parent)
    limits = tree.SpawnLimits(max_depth=5, max_children=10, max_live=20, max_sessions=100)
    async with service.db_factory() as db:
        with pytest.raises(tree.SpawnRefused, match="no longer live"):
            await tree.admit_child(db, parent=parent, limits=limits)
        counters = await db.get(SpawnTree, parent.root_id)
    assert counters is not None and counters.sessions_created == 1


async def test_stop_racing_spawn_leaves_no_live_child_behind(service: SessionService) -> None:
    """A child admitted while its parent's stop runs is stopped by the stop's second pass."""
    limits = tree.SpawnLimits(max_depth=5, max_children=10, max_live=20, max_sessions=100)
    for _ in range(10):
        parent = await _live_session(service)

        async def spawn(p: Session = parent) -> None:
            async with service.db_factory() as db:
                try:
                    await tree.admit_child(db, parent=p, limits=limits)
                except tree.SpawnRefused:
                    return
                child = Session(
                    id=str(uuid.uuid4()),
                    owner="alice",
                    status=SessionStatus.IDLE,
                    workspace_volume="v",
                    root_id=p.root_id,
                    parent_session_id=p.id,
                    depth=1,
                )
                db.add(child)
                await db.commit()

        async def stop(p: Session = parent) -> None:
            async with service.db_factory() as db:
                await service.stop(db=db, session=p)

        await asyncio.gather(spawn(), spawn(), stop())
        async with service.db_factory() as db:
            nodes = (await db.exec(select(Session).where(Session.root_id == parent.id))).all()
            counters = await db.get(SpawnTree, parent.id)
        assert all(not n.status.live for n in nodes), [(n.id, n.status) for n in nodes]
        assert counters is not None and counters.live_sessions == 0


async def test_the_reaper_leaves_a_session_being_created_alone(
    service: SessionService, redis_server: RedisContainer
) -> None:
    """A slow workspace clone: the row is live and old, the container does not exist yet."""
    from datetime import timedelta

    from gateway.db.models import utcnow
    from gateway.metrics import Metrics
    from gateway.services.container_deaths import DeathWatch
    from gateway.services.reaper import Reaper

    client = aioredis.Redis.from_url(redis_server.url)
    runtime = DockerRuntime(deployment=f"test-{uuid.uuid4().hex[:8]}")
    deaths = DeathWatch(
        runtime=runtime,
        redis=client,
        db_factory=service.db_factory,
        jwt_key=JWT_SECRET,
        metrics=Metrics(),
    )
    reaper = Reaper(
        deaths=deaths,
        runtime=runtime,
        db_factory=service.db_factory,
        redis=client,
        jwt_key=JWT_SECRET,
        token_ttl_s=3600,
        session_acl=False,
        interval_s=60,
        grace_s=1,
        creation_timeout_s=600,
    )
    creating, abandoned = str(uuid.uuid4()), str(uuid.uuid4())
    long_ago = utcnow() - timedelta(minutes=20)
    async with service.db_factory() as db:
        for sid, created in ((creating, utcnow()), (abandoned, long_ago)):
            db.add(SpawnTree(root_id=sid, owner="alice"))
            db.add(
                Session(
                    id=sid,
                    owner="alice",
                    status=SessionStatus.STARTING,
                    workspace_volume="v",
                    root_id=sid,
                    created_at=created,
                    last_activity=long_ago,
                )
            )
        await db.commit()
    done = await reaper.sweep()
    async with service.db_factory() as db:
        still = await db.get(Session, creating)
        given_up = await db.get(Session, abandoned)
    assert still is not None and still.status is SessionStatus.STARTING
    assert given_up is not None and given_up.status is SessionStatus.FAILED
    assert done["sessions_repaired"] == 1
    await runtime.close()
    await client.aclose()
