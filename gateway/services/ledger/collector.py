"""The artifact collector: copies a finished turn's files into the store, after the commit.

Jobs run on a bounded queue served by ``workers`` supervised tasks, outside any transaction or
lock: each file is streamed from the container (docker ``get_archive``) into the store (S3
multipart for large files) without being held in memory. Then one short transaction records the
Artifact rows, adds per-file problems to the turn's errors, clears ``Turn.pending_files`` and
sets ``recorded_at``; the gateway then announces ``turn_recorded`` on the session's live channel.

Jobs of one session run in order (a per-session lock), so a container release queued after a
turn's collection happens after it. A job lost with its process (a gateway crash) is found again
by :meth:`ArtifactCollector.recover`: turns final but unrecorded for longer than ``stale_s``.

Failure modes: storage down -> the job is retried with backoff (up to ``max_attempts``), then the
turn is recorded with "not collected" errors; a vanished or oversized file -> an error on the
turn; the queue full -> the job waits for ``recover`` (it stays in the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import IO, Any

import redis.asyncio as aioredis
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db.models import Artifact, Session, Turn, utcnow
from gateway.errors import DependencyUnavailable, GatewayError
from gateway.metrics import Metrics
from gateway.services.artifacts import ArtifactStore, safe_relative_path
from gateway.services.ledger.lifecycle import earlier_unrecorded
from gateway.services.runtime import ContainerRuntime
from gateway.services.session_redis import announce_turn_recorded

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """Collect a turn's files (``turn_id``) or release an ended session's container."""

    session_id: str
    turn_id: str | None = None
    release_container: str | None = None


class ArtifactCollector:
    """Bounded queue of collection jobs and the workers that run them."""

    def __init__(
        self,
        *,
        db_factory: async_sessionmaker[AsyncSession],
        runtime: ContainerRuntime,
        store: ArtifactStore,
        redis: aioredis.Redis,
        metrics: Metrics,
        max_artifact_bytes: int,
        queue_size: int = 1000,
        max_attempts: int = 5,
        stale_s: float = 60.0,
        order_wait_s: float = 30.0,
    ) -> None:
        self._db = db_factory
        self._runtime = runtime
        self._store = store
        self._redis = redis
        self._metrics = metrics
        self._max_bytes = max_artifact_bytes
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=queue_size)
        self._queued: set[Job] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._max_attempts = max_attempts
        self._stale = timedelta(seconds=stale_s)
        self._order_wait_s = order_wait_s

    @property
    def depth(self) -> int:
        """Jobs waiting in the queue."""
        return self._queue.qsize()

    def submit(self, job: Job) -> bool:
        """Queue a job without waiting; False when the queue is full (``recover`` finds it)."""
        if job in self._queued:
            return True
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            logger.warning("collector: queue full, %s left for recovery", job)
            return False
        self._queued.add(job)
        return True

    async def worker(self) -> None:
        """One worker loop (run several under the supervisor)."""
        while True:
            job = await self._queue.get()
            try:
                lock = self._locks.setdefault(job.session_id, asyncio.Lock())
                async with lock:
                    await self._run_with_retries(job)
            finally:
                self._queued.discard(job)
                self._queue.task_done()
                held = self._locks.get(job.session_id)
                if held is not None and not held.locked() and not self._pending_for(job):
                    self._locks.pop(job.session_id, None)

    def _pending_for(self, job: Job) -> bool:
        return any(j.session_id == job.session_id for j in self._queued)

    async def _run_with_retries(self, job: Job) -> None:
        delay = 0.5
        for attempt in range(1, self._max_attempts + 1):
            try:
                if job.turn_id is not None:
                    await self.collect_turn(job.session_id, job.turn_id)
                if job.release_container is not None:
                    await self._release(job.session_id, job.release_container)
                return
            except (DependencyUnavailable, SQLAlchemyError, OSError) as exc:
                if attempt == self._max_attempts:
                    logger.error("collector: %s failed %d times: %s", job, attempt, exc)
                    if job.turn_id is not None:
                        await self._give_up(job.session_id, job.turn_id, str(exc))
                    return
                logger.warning("collector: %s failed (attempt %d): %s", job, attempt, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def collect_turn(self, session_id: str, turn_id: str) -> None:
        """Copy the turn's pending files into the store and mark the turn recorded."""
        async with self._db() as db:
            turn = await db.get(Turn, turn_id)
            session = await db.get(Session, session_id)
        if turn is None or session is None or turn.recorded_at is not None:
            return
        started = time.monotonic()
        problems: list[str] = []
        collected: list[Artifact] = []
        container = session.container_id
        for item in turn.pending_files or []:
            try:
                path = safe_relative_path(str(item.get("path", "")))
            except GatewayError:
                problems.append(f"artifact {str(item.get('path'))[:200]!r}: unsafe path, skipped")
                continue
            if len(path) > 1024:
                problems.append(f"artifact {path[:200]}…: path longer than 1024 characters")
                continue
            if container is None:
                problems.append(f"artifact {path}: the session has no container")
                continue
            try:
                size, digest = await self._runtime.export_file(
                    container,
                    f"/workspace/{path}",
                    max_bytes=self._max_bytes,
                    sink=self._sink(session_id, path),
                )
            except (FileNotFoundError, ValueError) as exc:
                problems.append(f"artifact {path}: {exc}")
                continue
            self._metrics.artifact_bytes.inc(size)
            collected.append(
                Artifact(
                    session_id=session_id, path=path, size=size, sha256=digest, turn_id=turn_id
                )
            )
        await self._after_earlier_turns(turn)
        await self._record(session_id, turn_id, collected, problems)
        self._metrics.artifact_seconds.observe(time.monotonic() - started)

    async def _after_earlier_turns(self, turn: Turn) -> None:
        """Turns are recorded in order. In this process the per-session lock already orders
        them; an earlier turn collected by another replica is waited for (at most
        ``order_wait_s``, then recorded anyway: a dead replica's job is re-run by recovery)."""
        deadline = time.monotonic() + self._order_wait_s
        while time.monotonic() < deadline:
            async with self._db() as db:
                if not await earlier_unrecorded(db, turn):
                    return
            await asyncio.sleep(0.1)

    def _sink(self, session_id: str, path: str) -> Any:
        store = self._store

        def sink(reader: IO[bytes], size: int) -> None:
            store.put_stream(session_id, path, reader, size)  # type: ignore[arg-type]

        return sink

    async def _record(
        self, session_id: str, turn_id: str, artifacts: list[Artifact], problems: list[str]
    ) -> None:
        try:
            async with self._db() as db:
                turn = await db.get(Turn, turn_id)
                if turn is None or turn.recorded_at is not None:
                    return
                for artifact in artifacts:
                    existing = await db.get(Artifact, (session_id, artifact.path))
                    row = existing or artifact
                    row.size, row.sha256 = artifact.size, artifact.sha256
                    row.turn_id, row.updated_at = turn_id, utcnow()
                    db.add(row)
                if problems:
                    turn.errors = [*(turn.errors or []), *problems]
                turn.pending_files = None
                turn.recorded_at = utcnow()
                db.add(turn)
                await db.commit()
        except IntegrityError:
            logger.info("collector: session %s was deleted while collecting", session_id)
            return
        await self._announce(session_id, turn_id)

    async def _give_up(self, session_id: str, turn_id: str, reason: str) -> None:
        with contextlib.suppress(SQLAlchemyError):
            async with self._db() as db:
                turn = await db.get(Turn, turn_id)
                if turn is None or turn.recorded_at is not None:
                    return
                lost = [str(f.get("path")) for f in turn.pending_files or []]
                turn.errors = [
                    *(turn.errors or []),
                    *(f"artifact {p}: not collected ({reason})" for p in lost),
                ]
                turn.pending_files = None
                turn.recorded_at = utcnow()
                db.add(turn)
                await db.commit()
            await self._announce(session_id, turn_id)

    async def _announce(self, session_id: str, turn_id: str) -> None:
        try:
            await announce_turn_recorded(self._redis, session_id, turn_id)
        except DependencyUnavailable as exc:
            logger.warning("collector: could not announce %s: %s", turn_id, exc)

    async def _release(self, session_id: str, container_id: str) -> None:
        """Remove an ended session's container once no turn of it waits for collection."""
        async with self._db() as db:
            rows = await db.exec(
                select(Turn.id).where(
                    Turn.session_id == session_id, col(Turn.pending_files).is_not(None)
                )
            )
            waiting = list(rows.all())
        for turn_id in waiting:  # collected here, before the container goes
            await self.collect_turn(session_id, turn_id)
        await self._runtime.remove(container_id)

    async def recover(self) -> int:
        """Queue turns that finished more than ``stale_s`` ago and are still unrecorded (their
        job died with a process, or the queue was full). Returns how many were queued."""
        cutoff = utcnow() - self._stale
        async with self._db() as db:
            rows = await db.exec(
                select(Turn.session_id, Turn.id)
                .where(col(Turn.recorded_at).is_(None), col(Turn.completed_at) < cutoff)
                .limit(200)
            )
            stale = list(rows.all())
        return sum(1 for sid, tid in stale if self.submit(Job(sid, turn_id=tid)))
