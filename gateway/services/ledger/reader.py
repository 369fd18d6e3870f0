"""The ledger's reader: the consumer-group loop that feeds the persister and the applier.

Each gateway process runs one :class:`Ledger`. It reads the events streams of the live (and
recently ended) sessions through the consumer group ``ccgate-ledger`` (XREADGROUP ``>``), so
across replicas each entry is handled by one of them, and per read:

1. persists every entry of the batch in one statement (persister.py);
2. applies the wrapper's lifecycle events, each in its own short transaction (lifecycle.py),
   and after each commit runs its follow-ups (followups.py: the parent told, artifact
   collection queued in collector.py, ``turn_recorded`` announced);
3. acknowledges what was persisted and applied (XACK), then trims the stream (trim.py) up to
   the persisted watermark, keeping the newest ``stream_maxlen`` for replay — never an entry that is
   not yet in the database.

Failures: the database or Redis unreachable -> nothing is acknowledged, the pending entries are
re-read after a pause (the lag grows and shows in /metrics, nothing is lost). An entry that
fails for any other reason is retried ``max_attempts`` times, then kept in the ``deadletter``
table with its reason, logged and counted, and acknowledged, so it never blocks other entries or
other sessions. Every ``refresh_s`` the reader takes over entries a dead replica left pending
longer than ``ledger_claim_idle_s`` (XAUTOCLAIM).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError
from sqlalchemy import or_
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.config import Settings
from gateway.db.errors import is_outage
from gateway.db.models import Session, utcnow
from gateway.errors import DependencyUnavailable
from gateway.metrics import Metrics
from gateway.services.artifacts import ArtifactStore
from gateway.services.envelopes import notice_key
from gateway.services.ledger.collector import ArtifactCollector
from gateway.services.ledger.followups import FollowUps
from gateway.services.ledger.lifecycle import apply_lifecycle
from gateway.services.ledger.persister import Entry, dead_letter, parse_entry, persist_events
from gateway.services.ledger.trim import StreamTrimmer, seq_of_id
from gateway.services.runtime import ContainerRuntime
from gateway.services.session_redis import (
    ensure_ledger_group,
    group_backlog,
    ledger_group,
)
from gateway.services.tree import LIVE
from gateway.supervisor import Supervisor
from wrapper.protocol import ENVELOPE_FIELD, LEDGER_GROUP, events_key

logger = logging.getLogger(__name__)

_BLOCK_MS = 200
_REFRESH_S = 2.0
_RECENT_S = 120.0
_TRIM_EVERY_S = 1.0


class _Transient(Exception):
    """A dependency failed mid-batch: leave the rest pending and retry later."""


class Ledger:
    """Consumer-group reader of the sessions' event streams (one per gateway process)."""

    def __init__(
        self,
        *,
        settings: Settings,
        redis: aioredis.Redis,
        db_factory: async_sessionmaker[AsyncSession],
        runtime: ContainerRuntime,
        store: ArtifactStore,
        metrics: Metrics,
        supervisor: Supervisor,
        max_attempts: int = 5,
        collector_workers: int = 4,
    ) -> None:
        self._settings = settings
        self._notice_key = notice_key(settings.jwt_key())
        self._redis = redis
        self._db = db_factory
        self._metrics = metrics
        self._supervisor = supervisor
        self._max_attempts = max_attempts
        self._workers = collector_workers
        self.collector = ArtifactCollector(
            db_factory=db_factory,
            runtime=runtime,
            store=store,
            redis=redis,
            metrics=metrics,
            max_artifact_bytes=settings.max_artifact_bytes,
        )
        self._followups = FollowUps(
            settings=settings,
            redis=redis,
            db_factory=db_factory,
            metrics=metrics,
            collector=self.collector,
        )
        # Unique per instance: two ledgers with one name would re-read each other's pending
        # entries (same host and pid: several gateways in a process, pid 1 in containers).
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tracked: dict[str, str] = {}  # session id -> next read id (">" or "0")
        self._attempts: dict[tuple[str, str], int] = {}
        self._trimmer = StreamTrimmer(redis, keep=settings.stream_maxlen, every_s=_TRIM_EVERY_S)
        self._refreshed_at = 0.0

    # ------------------------------------------------------------------------ tracking

    def on_paused(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(session_id)`` after a crash paused a session (the lifecycle loop
        resumes it if prompts wait)."""
        self._followups.on_paused = callback

    def track(self, session_id: str) -> None:
        """Start reading a session's stream now (it is also found by the periodic refresh)."""
        self._tracked.setdefault(session_id, "0")

    def untrack(self, session_id: str) -> None:
        """Stop reading a session's stream (before its keys are deleted)."""
        self._tracked.pop(session_id, None)

    @property
    def tracked(self) -> int:
        """Sessions whose streams this process reads."""
        return len(self._tracked)

    async def start(self) -> None:
        """Start the reader and the collector's workers under the supervisor."""
        self._supervisor.start("ledger", self._run)
        for n in range(self._workers):
            self._supervisor.start(f"collector-{n}", self.collector.worker)

    async def close(self) -> None:
        """Cancel pending callbacks (the supervisor stops the loops)."""
        self._followups.close()

    async def lag(self) -> dict[str, int]:
        """Entries of each tracked session not yet persisted: pending (read, unacknowledged)
        plus not yet read (Redis 7 ``XINFO GROUPS`` ``lag``)."""
        sids = list(self._tracked)
        out: dict[str, int] = {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.xinfo_groups(events_key(sid))
            replies = await pipe.execute(raise_on_error=False)
        for sid, reply in zip(sids, replies, strict=True):
            if not isinstance(reply, Exception):
                out[sid] = group_backlog(ledger_group(reply))
        return out

    # ---------------------------------------------------------------------------- loop

    async def _run(self) -> None:
        while True:
            try:
                if time.monotonic() - self._refreshed_at > _REFRESH_S:
                    await self._refresh()
                if not self._tracked:
                    await asyncio.sleep(_BLOCK_MS / 1000)
                    continue
                await self._read_once()
            except ResponseError as exc:
                if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                    raise
                await self._repair_groups()
            except (RedisError, OSError, DependencyUnavailable, _Transient) as exc:
                logger.warning("ledger: dependency error, retrying: %s", exc)
                await asyncio.sleep(0.5)
            except SQLAlchemyError as exc:
                if not is_outage(exc):
                    raise
                logger.warning("ledger: database unavailable, retrying: %s", exc)
                await asyncio.sleep(0.5)

    async def _refresh(self) -> None:
        """Track live sessions and recently ended ones (their last events may be unread);
        take over abandoned entries; re-queue stale collections."""
        cutoff = utcnow() - timedelta(seconds=_RECENT_S)
        async with self._db() as db:
            rows = await db.exec(
                select(Session.id).where(
                    or_(col(Session.status).in_(LIVE), col(Session.last_activity) > cutoff)
                )
            )
            wanted = set(rows.all())
        for sid in wanted:
            self._tracked.setdefault(sid, "0")
        for sid in list(self._tracked):
            if sid not in wanted:
                self._tracked.pop(sid, None)
                self._trimmer.forget(sid)
        await self._claim_abandoned()
        await self._trimmer.trim_idle(self._tracked)
        await self.collector.recover()
        self._refreshed_at = time.monotonic()

    async def _claim_abandoned(self) -> None:
        """Take over entries a dead replica read but never acknowledged (after
        ``ledger_claim_idle_s``); they are then re-read from this consumer's pending list."""
        for sid in list(self._tracked):
            try:
                reply = await self._redis.xautoclaim(
                    events_key(sid),
                    LEDGER_GROUP,
                    self.consumer,
                    min_idle_time=int(self._settings.ledger_claim_idle_s * 1000),
                    start_id="0-0",
                    count=500,
                    justid=True,
                )
            except ResponseError:
                continue  # no stream or group yet
            claimed = claimed_ids(reply)
            if claimed:
                logger.info("ledger: claimed %d abandoned entries of %s", len(claimed), sid)
                self._tracked[sid] = "0"

    async def _repair_groups(self) -> None:
        """A stream or its group vanished (session deleted, or Redis restarted empty).

        Streams of live sessions get their group back; others are no longer read, so a
        deleted session's stream is never re-created.
        """
        await self._refresh()
        async with self._db() as db:
            rows = await db.exec(select(Session.id).where(col(Session.status).in_(LIVE)))
            live = set(rows.all())
        for sid in list(self._tracked):
            if sid in live:
                try:
                    await ensure_ledger_group(self._redis, sid)
                except RedisError as exc:
                    logger.warning("ledger: cannot restore the group of %s: %s", sid, exc)
            elif not await self._redis.exists(events_key(sid)):
                self._tracked.pop(sid, None)

    async def _read_once(self) -> None:
        streams = {events_key(sid): read_id for sid, read_id in self._tracked.items()}
        block = None if any(v == "0" for v in streams.values()) else _BLOCK_MS
        raw_reply = await self._redis.xreadgroup(
            LEDGER_GROUP,
            self.consumer,
            streams,  # type: ignore[arg-type]
            count=200,
            block=block,
        )
        reply = cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None, raw_reply)
        pending_reads = {sid for sid, read_id in self._tracked.items() if read_id == "0"}
        batch: list[Entry] = []
        for stream, entries in reply or []:
            sid = stream.decode().split(":")[2]
            if sid in pending_reads and entries:
                pending_reads.discard(sid)  # more pending may follow: read "0" again
            for entry_id, fields in entries:
                raw = (fields or {}).get(ENVELOPE_FIELD.encode())
                if raw is None:  # trimmed away while pending (a stream cut by hand)
                    await self._redis.xack(stream, LEDGER_GROUP, entry_id)
                    continue
                batch.append(parse_entry(sid, entry_id.decode(), raw, notice_key=self._notice_key))
        if batch:
            await self._process(batch)
        for sid in pending_reads:
            if sid in self._tracked:
                self._tracked[sid] = ">"

    # ------------------------------------------------------------------------ a batch

    async def _process(self, batch: list[Entry]) -> None:
        started = time.monotonic()
        persisted = await self._persist(batch)
        self._metrics.ledger_batch_seconds.observe(time.monotonic() - started)
        done: dict[str, list[Entry]] = defaultdict(list)
        blocked: set[str] = set()
        for entry in batch:
            sid = entry.session_id
            if sid in blocked:
                continue
            if entry not in persisted:
                blocked.add(sid)  # retried later, in order
                continue
            if entry.envelope is None:
                await self._dead_letter(entry, entry.problem or "invalid envelope", attempts=1)
            elif entry.envelope.get("source") == "wrapper" or (
                entry.envelope.get("source") == "gateway"
                and entry.envelope.get("type") in ("turn_completed", "exited")
            ):
                if not await self._apply(entry):
                    blocked.add(sid)
                    continue
            done[sid].append(entry)
        for sid, entries in done.items():
            await self._ack(sid, entries)
        for sid in blocked:
            if sid in self._tracked:
                self._tracked[sid] = "0"

    async def _persist(self, batch: list[Entry]) -> set[Entry]:
        """Persist the batch in one statement; on a non-outage failure, entry by entry so a
        poison entry is found and dead-lettered. Returns the entries that are safe to ack."""
        invalid = [e for e in batch if e.envelope is None]  # dead-lettered in order, later
        valid = [e for e in batch if e.envelope is not None]
        try:
            self._metrics.events_persisted.inc(await persist_events(self._db, valid))
            return set(batch)
        except SQLAlchemyError as exc:
            if is_outage(exc):
                raise
            logger.warning(
                "ledger: batch of %d failed (%s); persisting one by one", len(valid), exc
            )
        ok: set[Entry] = set(invalid)
        for entry in valid:
            try:
                self._metrics.events_persisted.inc(await persist_events(self._db, [entry]))
                ok.add(entry)
            except SQLAlchemyError as exc:
                if is_outage(exc):
                    raise
                if await self._failed(entry, f"persist: {type(exc).__name__}: {exc}"):
                    ok.add(entry)
        return ok

    async def _apply(self, entry: Entry) -> bool:
        """Apply one lifecycle event; False when it must be retried later."""
        assert entry.envelope is not None
        envelope = entry.envelope
        data = envelope.get("data") if isinstance(envelope.get("data"), dict) else {}
        turn_id = envelope.get("turn_id") if isinstance(envelope.get("turn_id"), str) else None
        try:
            async with self._db() as db:
                applied = await apply_lifecycle(
                    db,
                    entry.session_id,
                    str(envelope["type"]),
                    turn_id,
                    data or {},
                    max_crash_resumes=self._settings.max_crash_resumes,
                )
                await db.commit()
        except SQLAlchemyError as exc:
            if is_outage(exc):
                raise
            return await self._failed(entry, f"apply: {type(exc).__name__}: {exc}")
        except DependencyUnavailable:
            raise
        except Exception as exc:
            logger.exception("ledger: applying %s %s failed", entry.session_id, entry.entry_id)
            return await self._failed(entry, f"apply: {type(exc).__name__}: {exc}")
        await self._followups.run(entry.session_id, applied)
        return True

    async def _failed(self, entry: Entry, reason: str) -> bool:
        """Count a failure; dead-letter (and return True: ack it) after ``max_attempts``."""
        key = (entry.session_id, entry.entry_id)
        attempts = self._attempts.get(key, 0) + 1
        self._attempts[key] = attempts
        logger.warning(
            "ledger: %s %s failed (attempt %d/%d): %s",
            entry.session_id,
            entry.entry_id,
            attempts,
            self._max_attempts,
            reason,
        )
        if attempts < self._max_attempts:
            return False
        await self._dead_letter(entry, reason, attempts=attempts)
        return True

    async def _dead_letter(self, entry: Entry, reason: str, *, attempts: int) -> None:
        await dead_letter(self._db, entry, attempts=attempts, reason=reason)
        self._attempts.pop((entry.session_id, entry.entry_id), None)
        self._metrics.dead_letters.labels(reason=reason.split(":")[0][:40]).inc()
        logger.error(
            "ledger: dead-lettered %s %s after %d attempts: %s",
            entry.session_id,
            entry.entry_id,
            attempts,
            reason,
        )

    # ------------------------------------------------------------------------------ ack

    async def _ack(self, sid: str, entries: list[Entry]) -> None:
        ids = [e.entry_id for e in entries]
        await self._redis.xack(events_key(sid), LEDGER_GROUP, *ids)
        for entry in entries:
            self._attempts.pop((sid, entry.entry_id), None)
        await self._trimmer.acknowledged(sid, (seq_of_id(i) for i in ids))


def claimed_ids(reply: Any) -> list[Any]:
    """Ids from an XAUTOCLAIM ``justid`` reply: redis-py returns the bare id list then, and
    ``[next, ids, deleted]`` without justid (or from older versions)."""
    if not reply:
        return []
    if isinstance(reply, list | tuple) and len(reply) >= 2 and isinstance(reply[1], list):
        return list(reply[1])
    return list(reply)
