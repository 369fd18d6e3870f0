"""The ledger: persists every session event and applies lifecycle events to the database.

Each gateway process runs one Ledger. It reads the events streams of the live sessions through
the consumer group ``ccgate-ledger`` (XREADGROUP ... ``>``), so across replicas each entry is
handled by one of them; an entry is XACKed only after its database transaction committed, and one
that failed is re-read from the consumer's pending list (``0``) on the next pass.

Applied events (``wrapper.protocol.EventType``):
    ready           starting -> idle; records the CLI session id
    turn_started    turn queued -> running; session -> running
    turn_completed  artifacts collected into the store; turn result, usage and cost recorded;
                    session totals updated (``total_cost_usd`` is the CLI's running total: the
                    latest value is kept, never summed); session -> idle
    error           kept as the session's last error
    exited          session -> stopped (asked) or failed (crashed); container removed

A child's turn results and end are also told to its parent (``child_result``,
``child_failed``, ``child_stopped`` through the parent's wrapper) and POSTed to the child's
``callback`` URL when it has one; its spend is rolled up into its tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import time
import uuid
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
from gateway.db.models import (
    Artifact,
    Event,
    Session,
    SessionStatus,
    Turn,
    TurnStatus,
    utcnow,
)
from gateway.errors import GatewayError
from gateway.services.artifacts import ArtifactStore, safe_relative_path
from gateway.services.callbacks import post_callback
from gateway.services.runtime import ContainerRuntime
from gateway.services.session_redis import ensure_ledger_group, notify
from gateway.services.sessions import cancel_open_turns
from gateway.services.tree import LIVE, add_spend, end_session, lock_tree
from wrapper.protocol import ENVELOPE_FIELD, LEDGER_GROUP, EventType, events_key

logger = logging.getLogger(__name__)

_BLOCK_MS = 200
_REFRESH_S = 2.0
_RECENT_S = 120.0

_USAGE_KEYS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


def turn_status_of(data: dict[str, Any]) -> TurnStatus:
    """Final turn status from a turn_completed event (interrupts are recognised by
    ``terminal_reason``, not ``is_error``, which differs between CLI versions)."""
    reason = str(data.get("terminal_reason") or "")
    if reason.startswith("aborted") or reason in ("stopped", "turn_timeout"):
        return TurnStatus.INTERRUPTED
    if data.get("is_error"):
        return TurnStatus.FAILED
    return TurnStatus.COMPLETED


def add_usage(total: dict[str, Any], usage: dict[str, Any] | None) -> dict[str, Any]:
    """Sum the token counters of one turn's ``usage`` into a session total."""
    out = dict(total)
    for key in _USAGE_KEYS:
        value = (usage or {}).get(key)
        if isinstance(value, int):
            out[key] = int(out.get(key, 0)) + value
    return out


class Ledger:
    """Consumer-group reader of live sessions' event streams (one per gateway process)."""

    def __init__(
        self,
        *,
        settings: Settings,
        redis: aioredis.Redis,
        db_factory: async_sessionmaker[AsyncSession],
        runtime: ContainerRuntime,
        store: ArtifactStore,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._db = db_factory
        self._runtime = runtime
        self._store = store
        # Unique per instance: two ledgers with one name would re-read each other's pending
        # entries (same host and pid: several gateways in a process, pid 1 in containers).
        self._consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tracked: dict[str, str] = {}  # session id -> next read id (">" or "0")
        self._refreshed_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    def track(self, session_id: str) -> None:
        """Start reading a session's stream now (it is also found by the periodic refresh)."""
        self._tracked.setdefault(session_id, "0")

    def untrack(self, session_id: str) -> None:
        """Stop reading a session's stream (before its keys are deleted)."""
        self._tracked.pop(session_id, None)

    async def start(self) -> None:
        """Start the reader task."""
        self._task = asyncio.create_task(self._run(), name="ledger")

    async def close(self) -> None:
        """Stop the reader task and pending callbacks."""
        for pending in list(self._background):
            pending.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _refresh(self) -> None:
        """Track live sessions and recently ended ones (their last events may be unread)."""
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
        await self._claim_abandoned()
        self._refreshed_at = time.monotonic()

    async def _claim_abandoned(self) -> None:
        """Take over entries a dead replica read but never acknowledged (after
        ``ledger_claim_idle_s``)."""
        for sid in list(self._tracked):
            try:
                reply = await self._redis.xautoclaim(
                    events_key(sid),
                    LEDGER_GROUP,
                    self._consumer,
                    min_idle_time=int(self._settings.ledger_claim_idle_s * 1000),
                    start_id="0-0",
                    count=500,
                    justid=True,
                )
            except ResponseError:
                continue  # no stream or group yet
            if reply and reply[1]:
                logger.info("ledger: claimed %d abandoned entries of %s", len(reply[1]), sid)
                self._tracked[sid] = "0"

    async def _run(self) -> None:
        while True:
            try:
                if time.monotonic() - self._refreshed_at > _REFRESH_S:
                    await self._refresh()
                if not self._tracked:
                    await asyncio.sleep(_BLOCK_MS / 1000)
                    continue
                await self._read_once()
            except asyncio.CancelledError:
                raise
            except ResponseError as exc:
                if "NOGROUP" in str(exc) or "UNBLOCKED" in str(exc):
                    await self._repair_groups()
                else:
                    logger.exception("ledger: redis error")
                    await asyncio.sleep(0.5)
            except (RedisError, OSError, SQLAlchemyError) as exc:
                logger.warning("ledger: dependency error, retrying: %s", exc)
                await asyncio.sleep(0.5)
            except Exception:
                logger.exception("ledger: unexpected error")
                await asyncio.sleep(0.5)

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
                with contextlib.suppress(RedisError):
                    await ensure_ledger_group(self._redis, sid)
            elif not await self._redis.exists(events_key(sid)):
                self._tracked.pop(sid, None)

    async def _read_once(self) -> None:
        streams = {events_key(sid): read_id for sid, read_id in self._tracked.items()}
        block = None if any(v == "0" for v in streams.values()) else _BLOCK_MS
        raw_reply = await self._redis.xreadgroup(
            LEDGER_GROUP,
            self._consumer,
            streams,  # type: ignore[arg-type]
            count=200,
            block=block,
        )
        reply = cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None, raw_reply)
        seen_pending = {sid for sid, read_id in self._tracked.items() if read_id == "0"}
        for stream, entries in reply or []:
            sid = stream.decode().split(":")[2]
            if sid in seen_pending and entries:
                seen_pending.discard(sid)  # more pending may follow: read "0" again
            for entry_id, fields in entries:
                if not fields:  # trimmed away while pending
                    await self._redis.xack(stream, LEDGER_GROUP, entry_id)
                    continue
                try:
                    await self._apply(sid, fields[ENVELOPE_FIELD.encode()])
                except (SQLAlchemyError, GatewayError, OSError) as exc:
                    logger.warning("ledger: %s %s not applied yet: %s", sid, entry_id, exc)
                    if sid in self._tracked:
                        self._tracked[sid] = "0"
                    await asyncio.sleep(0.2)
                    break
                await self._redis.xack(stream, LEDGER_GROUP, entry_id)
        for sid in seen_pending:
            if sid in self._tracked:
                self._tracked[sid] = ">"

    async def _apply(self, sid: str, raw: bytes) -> None:
        envelope = json.loads(raw)
        seq = int(envelope["seq"])
        kind = str(envelope.get("type"))
        turn_id = envelope.get("turn_id")
        data = envelope.get("data") if isinstance(envelope.get("data"), dict) else {}
        files: list[dict[str, Any]] = []
        if kind == EventType.TURN_COMPLETED and envelope.get("source") == "wrapper":
            files = data.get("files") or []
        after_commit: list[tuple[Session, EventType, dict[str, Any]]] = []
        lifecycle = envelope.get("source") == "wrapper"
        async with self._db() as db:
            session = await db.get(Session, sid)
            if session is None:
                return  # deleted
            if lifecycle:
                # The tree lock comes before any other row of this tree (tree.py: lock order).
                await lock_tree(db, session.root_id)
            if await db.get(Event, (sid, seq)) is not None:
                return  # already applied (redelivered entry)
            db.add(
                Event(
                    session_id=sid,
                    seq=seq,
                    turn_id=turn_id,
                    type=kind[:64],
                    envelope=raw.decode("utf-8", errors="replace"),
                )
            )
            if lifecycle:
                artifact_errors = await self._collect_artifacts(db, session, turn_id, files)
                told = await self._apply_lifecycle(
                    db, session, kind, turn_id, data, artifact_errors
                )
                if told is not None:
                    after_commit.append((session, *told))
            session.last_activity = utcnow()
            db.add(session)
            await db.commit()
        for child, event, payload in after_commit:
            await self._tell_parent(child, event, payload)

    async def _apply_lifecycle(
        self,
        db: AsyncSession,
        session: Session,
        kind: str,
        turn_id: str | None,
        data: dict[str, Any],
        artifact_errors: list[str],
    ) -> tuple[EventType, dict[str, Any]] | None:
        """Apply one wrapper event; returns what to tell the parent, if anything."""
        if kind == EventType.READY:
            session.cli_session_id = data.get("cli_session_id")
            if session.status is SessionStatus.STARTING:
                session.status = SessionStatus.IDLE
        elif kind == EventType.TURN_STARTED and turn_id:
            turn = await db.get(Turn, turn_id)
            # Replicas may apply a session's entries out of order: a turn already completed
            # by another replica neither runs again nor marks the session running.
            if turn is not None and turn.status is TurnStatus.QUEUED:
                turn.status = TurnStatus.RUNNING
                turn.started_at = utcnow()
                db.add(turn)
                if session.status.live:
                    session.status = SessionStatus.RUNNING
        elif kind == EventType.TURN_COMPLETED and turn_id:
            turn = await self._complete_turn(db, session, turn_id, data, artifact_errors)
            if turn is not None:
                event = EventType.CHILD_FAILED if turn.is_error else EventType.CHILD_RESULT
                return event, {
                    "child_session_id": session.id,
                    "message_id": turn.id,
                    "status": turn.status.value,
                    "subtype": turn.subtype,
                    "is_error": turn.is_error,
                    "result": turn.result,
                    "total_cost_usd": turn.total_cost_usd,
                }
        elif kind == EventType.ERROR:
            session.error = str(data.get("message") or data.get("code"))[:4000]
        elif kind == EventType.EXITED:
            ended = await self._on_exited(db, session, data)
            if ended is not None:
                event = (
                    EventType.CHILD_STOPPED
                    if ended is SessionStatus.STOPPED
                    else EventType.CHILD_FAILED
                )
                return event, {
                    "child_session_id": session.id,
                    "status": ended.value,
                    "error": session.error,
                }
        return None

    async def _complete_turn(
        self,
        db: AsyncSession,
        session: Session,
        turn_id: str,
        data: dict[str, Any],
        artifact_errors: list[str],
    ) -> Turn | None:
        turn = await db.get(Turn, turn_id)
        if turn is None or turn.status.final:
            return None
        total = data.get("total_cost_usd")
        turn.status = turn_status_of(data)
        turn.subtype = data.get("subtype")
        turn.is_error = bool(data.get("is_error"))
        turn.result = data.get("result")
        errors = [str(e) for e in data.get("errors") or []] + artifact_errors
        turn.errors = errors or None
        turn.terminal_reason = data.get("terminal_reason")
        turn.usage = data.get("usage")
        turn.num_turns = data.get("num_turns")
        turn.duration_ms = data.get("duration_ms")
        turn.completed_at = utcnow()
        if isinstance(total, int | float):
            previous = session.total_cost_usd
            turn.total_cost_usd = float(total)
            turn.cost_usd = float(total) - previous if total >= previous else float(total)
            session.total_cost_usd = float(total)
            await add_spend(db, root_id=session.root_id, delta_usd=turn.cost_usd)
        db.add(turn)
        session.total_turns += 1
        session.usage = add_usage(session.usage, turn.usage)
        if data.get("cli_session_id"):
            session.cli_session_id = data["cli_session_id"]
        if session.status is SessionStatus.RUNNING:
            session.status = SessionStatus.IDLE
        return turn

    async def _on_exited(
        self, db: AsyncSession, session: Session, data: dict[str, Any]
    ) -> SessionStatus | None:
        """End the session (stopped or failed); None when it had already ended."""
        if not session.status.live:
            return None
        if data.get("reason") == "stopped":
            status, error = SessionStatus.STOPPED, None
        else:
            status = SessionStatus.FAILED
            error = session.error or f"the session container exited ({data.get('reason')})"
        db.add(session)
        await cancel_open_turns(db, session.id)
        if not await end_session(db, session, status, error):
            return None
        if session.container_id:
            with contextlib.suppress(GatewayError):
                await self._runtime.remove(session.container_id)
        return status

    async def _tell_parent(self, child: Session, event: EventType, payload: dict[str, Any]) -> None:
        """child_* event in the parent's stream, and the child's callback, after commit."""
        if child.parent_session_id:
            with contextlib.suppress(GatewayError):
                await notify(self._redis, child.parent_session_id, event, payload)
        if child.callback_url:
            task = asyncio.create_task(post_callback(child.callback_url, event, payload))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _collect_artifacts(
        self, db: AsyncSession, session: Session, turn_id: str | None, files: list[dict[str, Any]]
    ) -> list[str]:
        """Copy changed workspace files into the artifact store; returns per-file problems.

        Storage being down raises (the event is retried); a file that vanished or is too
        large is reported in the turn's errors instead.
        """
        problems: list[str] = []
        if not files or not session.container_id:
            return problems
        for item in files:
            try:
                path = safe_relative_path(str(item.get("path", "")))
            except GatewayError:
                problems.append(f"artifact {item.get('path')!r}: unsafe path, skipped")
                continue
            try:
                blob = await self._runtime.read_file(
                    session.container_id,
                    f"/workspace/{path}",
                    max_bytes=self._settings.max_artifact_bytes,
                )
            except (FileNotFoundError, ValueError) as exc:
                problems.append(f"artifact {path}: {exc}")
                continue
            await self._store.put(session.id, path, blob)
            existing = await db.get(Artifact, (session.id, path))
            artifact = existing or Artifact(session_id=session.id, path=path, size=0, sha256="")
            artifact.size = len(blob)
            artifact.sha256 = hashlib.sha256(blob).hexdigest()
            artifact.turn_id = turn_id
            artifact.updated_at = utcnow()
            db.add(artifact)
        return problems
