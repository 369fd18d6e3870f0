"""The lifecycle applier: what a wrapper event changes in the database.

Each event is applied in its own short transaction, taken under the tree's row lock (tree.py:
lock order). Every rule is idempotent and order-tolerant, because an entry can be re-read after a
failure and entries of one session can be applied by different replicas:

    ready           starting -> idle; records the CLI session id
    turn_started    turn queued -> running (never back from a final status); session -> running
    turn_completed  turn result recorded at once (only while not yet final); its cost and
                    tokens are the model proxy's (metering/), never the CLI's report;
                    the changed files are left in ``Turn.pending_files`` for the collector, and a
                    turn without files is recorded (``recorded_at``) in the same commit
    error           kept as the session's last error
    exited          stopped (asked): session -> stopped, open turns cancelled/interrupted;
                    crashed (the wrapper gave up, or the gateway closed the stream of a
                    container that died: ``cause`` oom/killed/exited): session -> paused with
                    that reason, queued turns kept for the resume — or failed once it has
                    crashed more than ``max_crash_resumes`` times in a row; a session the
                    gateway is pausing (already ``paused``) is left to the pause.
                    The dead container is released by the collector once its files are copied.

Events of ``source: gateway`` that carry a wrapper type (``turn_completed``, ``exited``) were
written by the gateway for a dead container (envelopes.py checks their signature) and are
applied the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db.models import Session, SessionStatus, Turn, TurnStatus, as_utc, utcnow
from gateway.services.tree import cancel_open_turns, end_session, lock_tree
from wrapper.protocol import EventType


def turn_status_of(data: dict[str, Any]) -> TurnStatus:
    """Final turn status from a turn_completed event (interrupts are recognised by
    ``terminal_reason``, not ``is_error``, which differs between CLI versions)."""
    reason = str(data.get("terminal_reason") or "")
    if reason.startswith("aborted") or reason in ("stopped", "turn_timeout", "interrupt_ignored"):
        return TurnStatus.INTERRUPTED
    if data.get("is_error"):
        return TurnStatus.FAILED
    return TurnStatus.COMPLETED


@dataclass
class Applied:
    """What the caller does after the commit."""

    tell_parent: tuple[EventType, dict[str, Any]] | None = None
    collect_turn: str | None = None
    """A turn whose files the collector copies (then announces ``turn_recorded``)."""
    recorded_turn: str | None = None
    """A turn recorded in this very commit (no files): announce ``turn_recorded`` now."""
    release_container: str | None = None
    """The session ended: the collector removes this container after its turns' files."""
    finished: Turn | None = None
    ended: SessionStatus | None = None
    paused: bool = False
    """The session's container died and the session was paused (resume if prompts wait)."""
    resumed_s: float | None = None
    """A resumed session became ready: seconds since its resume began."""
    notes: list[str] = field(default_factory=list)


async def apply_lifecycle(
    db: AsyncSession,
    sid: str,
    kind: str,
    turn_id: str | None,
    data: dict[str, Any],
    *,
    max_crash_resumes: int = 3,
) -> Applied:
    """Apply one wrapper event of session ``sid`` in the current transaction (the caller
    commits). Returns what to do after the commit; nothing when the session is gone."""
    applied = Applied()
    session = await db.get(Session, sid)
    if session is None:
        return applied
    await lock_tree(db, session.root_id)
    await db.refresh(session)
    if kind == EventType.READY:
        session.cli_session_id = data.get("cli_session_id")
        if session.status is SessionStatus.STARTING:
            session.status = SessionStatus.IDLE
            resumed = as_utc(session.resumed_at)
            if resumed is not None:
                applied.resumed_s = max(0.0, (utcnow() - resumed).total_seconds())
                session.resumed_at = None
    elif kind == EventType.TURN_STARTED and turn_id:
        turn = await db.get(Turn, turn_id)
        if turn is not None and turn.session_id == sid and turn.status is TurnStatus.QUEUED:
            turn.status = TurnStatus.RUNNING
            turn.started_at = utcnow()
            db.add(turn)
            if session.status.live:
                session.status = SessionStatus.RUNNING
    elif kind == EventType.TURN_COMPLETED and turn_id:
        turn = await _complete_turn(db, session, turn_id, data)
        if turn is not None:
            applied.finished = turn
            if turn.pending_files is not None:
                applied.collect_turn = turn.id
            else:
                applied.recorded_turn = turn.id
            event = EventType.CHILD_FAILED if turn.is_error else EventType.CHILD_RESULT
            applied.tell_parent = (
                event,
                {
                    "child_session_id": session.id,
                    "message_id": turn.id,
                    "status": turn.status.value,
                    "subtype": turn.subtype,
                    "is_error": turn.is_error,
                    "result": turn.result,
                    "total_cost_usd": turn.total_cost_usd,
                },
            )
    elif kind == EventType.ERROR:
        session.error = str(data.get("message") or data.get("code"))[:4000]
    elif kind == EventType.EXITED:
        if session.status is SessionStatus.PAUSED:
            pass  # the gateway is pausing it: the pause releases the container
        elif (
            data.get("reason") != "stopped"
            and session.status.live
            and (session.crashes < max_crash_resumes)
        ):
            if session.container_id:
                applied.release_container = session.container_id
            await _pause_after_crash(db, session, data)
            applied.paused = True
            session.last_activity = utcnow()
            db.add(session)
            return applied
        elif session.container_id:
            applied.release_container = session.container_id
        ended = await _on_exited(db, session, data)
        if ended is not None:
            applied.ended = ended
            event = (
                EventType.CHILD_STOPPED
                if ended is SessionStatus.STOPPED
                else EventType.CHILD_FAILED
            )
            applied.tell_parent = (
                event,
                {
                    "child_session_id": session.id,
                    "status": ended.value,
                    "error": session.error,
                },
            )
    session.last_activity = utcnow()
    db.add(session)
    return applied


async def _complete_turn(
    db: AsyncSession, session: Session, turn_id: str, data: dict[str, Any]
) -> Turn | None:
    turn = await db.get(Turn, turn_id)
    if turn is None or turn.session_id != session.id or turn.status.final:
        return None
    now = utcnow()
    turn.status = turn_status_of(data)
    turn.subtype = _short(data.get("subtype"))
    turn.is_error = bool(data.get("is_error"))
    result = data.get("result")
    turn.result = result if isinstance(result, str) else None
    turn.structured_output = _bounded_json(data.get("structured_output"))
    errors = [str(e) for e in data.get("errors") or []]
    turn.errors = errors or None
    turn.terminal_reason = _short(data.get("terminal_reason"))
    turn.num_turns = _int(data.get("num_turns"))
    turn.duration_ms = _int(data.get("duration_ms"))
    turn.completed_at = now
    turn.outcome = _short(data.get("outcome"), 16)
    if turn.status is TurnStatus.COMPLETED:
        session.crashes = 0
    files = [f for f in data.get("files") or [] if isinstance(f, dict)]
    # Turns are recorded in order: one without files still goes through the collector when an
    # earlier turn's files are being copied, so "recorded" never overtakes an earlier turn.
    if files or await earlier_unrecorded(db, turn):
        turn.pending_files, turn.recorded_at = files, None
    else:
        turn.pending_files, turn.recorded_at = None, now
    # Cost and tokens were metered by the model proxy as the turn's requests went through
    # (the CLI's total_cost_usd is its own estimate, made inside the sandbox: not trusted).
    turn.total_cost_usd = session.total_cost_usd
    db.add(turn)
    session.total_turns += 1
    if isinstance(data.get("cli_session_id"), str):
        session.cli_session_id = data["cli_session_id"][:64]
    if session.status is SessionStatus.RUNNING:
        session.status = SessionStatus.IDLE
    return turn


async def _pause_after_crash(db: AsyncSession, session: Session, data: dict[str, Any]) -> None:
    """The container died: paused (reason: how it died), the running turn failed if it never
    got its turn_completed, queued turns kept for the resume."""
    cause = str(data.get("cause") or "crashed")[:32]
    session.status = SessionStatus.PAUSED
    session.paused_reason = cause
    session.crashes += 1
    session.container_id = None
    session.error = session.error or f"the session container died ({cause})"
    rows = await db.exec(
        select(Turn).where(Turn.session_id == session.id, Turn.status == TurnStatus.RUNNING)
    )
    now = utcnow()
    for turn in rows.all():
        turn.status = TurnStatus.FAILED
        turn.is_error = True
        turn.outcome = cause if cause in ("oom", "killed", "exited") else "exited"
        turn.terminal_reason = f"container_{turn.outcome}"
        turn.errors = [f"the session container died ({cause}) during the turn"]
        turn.completed_at = turn.recorded_at = now
        db.add(turn)


async def _on_exited(
    db: AsyncSession, session: Session, data: dict[str, Any]
) -> SessionStatus | None:
    """End the session (stopped or failed); None when it had already ended."""
    if not session.status.live:
        return None
    if data.get("reason") == "stopped":
        status, error = SessionStatus.STOPPED, None
    else:
        status = SessionStatus.FAILED
        error = session.error or f"the session container exited ({data.get('reason')})"
    ended = await end_session(db, session, status, error)
    await cancel_open_turns(
        db,
        session.id,
        running=TurnStatus.INTERRUPTED if status is SessionStatus.STOPPED else TurnStatus.FAILED,
        reason="stopped" if status is SessionStatus.STOPPED else "exited",
    )
    return status if ended else None


async def earlier_unrecorded(db: AsyncSession, turn: Turn) -> int:
    """Finished turns of the same session, older than ``turn``, whose files are still being
    copied (final, not yet recorded)."""
    rows = await db.exec(
        select(func.count())
        .select_from(Turn)
        .where(
            Turn.session_id == turn.session_id,
            Turn.id != turn.id,
            col(Turn.created_at) <= turn.created_at,
            col(Turn.status).not_in([TurnStatus.QUEUED, TurnStatus.RUNNING]),
            col(Turn.recorded_at).is_(None),
        )
    )
    return int(rows.one())


def _short(value: Any, limit: int = 64) -> str | None:
    return str(value)[:limit] if value is not None else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


STRUCTURED_MAX_BYTES = 1024 * 1024


def _bounded_json(value: Any) -> Any:
    """A JSON value from the container, dropped (None) when it serialises to more than
    STRUCTURED_MAX_BYTES."""
    if value is None:
        return None
    try:
        size = len(json.dumps(value))
    except (TypeError, ValueError):
        return None
    return value if size <= STRUCTURED_MAX_BYTES else None
