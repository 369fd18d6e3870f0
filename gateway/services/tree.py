"""Session trees: spawn limits that hold under concurrency, and the end of a live session.

A tree is a root session and everything spawned under it. Its counters live in one SpawnTree row
and in each parent's ``live_children``. Admission of a child is a series of conditional UPDATEs
(``... SET n = n + 1 WHERE n < limit``) in the transaction that inserts the child: the database
serialises them on the row (PostgreSQL row lock, SQLite write lock), so 20 concurrent spawns
against a limit of 5 admit exactly 5. A refusal rolls the transaction back and names the limit.

Every path that ends a live session goes through :func:`end_session`, which flips the status
with a conditional UPDATE and releases the live counters exactly once.

Lock order: a transaction that changes more than one row of a tree (stop, end_session, the
ledger's lifecycle events, the reaper) first takes the tree's row lock (:func:`lock_tree`), so
they serialise per tree instead of deadlocking on turn and session rows taken in other orders.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import or_, update
from sqlalchemy.sql.dml import UpdateBase
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db.models import Session, SessionStatus, SpawnTree, Turn, TurnStatus, utcnow
from gateway.errors import SpawnRefused

__all__ = [
    "LIVE",
    "OPEN",
    "SpawnLimits",
    "SpawnRefused",
    "add_spend",
    "admit_child",
    "cancel_open_turns",
    "end_session",
    "lock_tree",
    "release_admission",
]

LIVE = [SessionStatus.STARTING, SessionStatus.IDLE, SessionStatus.RUNNING]
OPEN = [*LIVE, SessionStatus.PAUSED, SessionStatus.QUEUED]
"""Not ended: live, paused or queued. A paused or queued session counts in its tree's
``live_sessions`` and its parent's ``live_children`` (the tree's room is taken at create; the
deployment's room for its container is admission.py's)."""


@dataclass(frozen=True)
class SpawnLimits:
    """Limits of a tree (from Settings)."""

    max_depth: int
    max_children: int
    max_live: int
    max_sessions: int


async def lock_tree(db: AsyncSession, root_id: str) -> None:
    """Take the tree's row lock for the rest of the transaction (PostgreSQL ``FOR UPDATE``;
    SQLite serialises writers anyway)."""
    await db.exec(
        select(SpawnTree.root_id).where(col(SpawnTree.root_id) == root_id).with_for_update()
    )


async def _bump(db: AsyncSession, statement: UpdateBase) -> bool:
    result = await db.exec(statement)
    return bool(result.rowcount == 1)


async def admit_child(db: AsyncSession, *, parent: Session, limits: SpawnLimits) -> float | None:
    """Reserve room for one child of ``parent`` in the current transaction.

    Returns the tree's remaining cost budget in USD (None when unlimited). Raises SpawnRefused
    (after rolling back) when depth, children, live sessions, sessions created or budget would
    be exceeded.
    """
    depth = parent.depth + 1
    if depth > limits.max_depth:
        raise SpawnRefused(
            f"spawn refused: max_spawn_depth is {limits.max_depth}; "
            f"a child of session {parent.id} would be at depth {depth}"
        )
    tree_id = parent.root_id
    checks: list[tuple[UpdateBase, str]] = [
        (
            update(SpawnTree)
            .where(col(SpawnTree.root_id) == tree_id)
            .where(col(SpawnTree.sessions_created) < limits.max_sessions)
            .values(sessions_created=col(SpawnTree.sessions_created) + 1),
            f"spawn refused: max_sessions_per_tree is {limits.max_sessions} "
            "(sessions ever created in this tree, root included)",
        ),
        (
            update(SpawnTree)
            .where(col(SpawnTree.root_id) == tree_id)
            .where(col(SpawnTree.live_sessions) < limits.max_live)
            .values(live_sessions=col(SpawnTree.live_sessions) + 1),
            f"spawn refused: max_live_sessions_per_tree is {limits.max_live}",
        ),
        (
            update(Session)
            .where(col(Session.id) == parent.id)
            .where(col(Session.status).in_(LIVE))
            .values(live_children=col(Session.live_children)),
            f"spawn refused: parent session {parent.id} is no longer live",
        ),
        (
            update(Session)
            .where(col(Session.id) == parent.id)
            .where(col(Session.live_children) < limits.max_children)
            .where(col(Session.status).in_(LIVE))
            .values(live_children=col(Session.live_children) + 1),
            f"spawn refused: max_children_per_session is {limits.max_children} "
            f"(live children of session {parent.id})",
        ),
        (
            update(SpawnTree)
            .where(col(SpawnTree.root_id) == tree_id)
            .where(
                or_(
                    col(SpawnTree.budget_usd).is_(None),
                    col(SpawnTree.spend_usd) < col(SpawnTree.budget_usd),
                )
            )
            .values(spend_usd=col(SpawnTree.spend_usd)),
            "spawn refused: the tree's cost budget is spent",
        ),
    ]
    for statement, refusal in checks:
        if not await _bump(db, statement):
            await db.rollback()
            raise SpawnRefused(refusal)
    tree = await db.get(SpawnTree, tree_id)
    if tree is None or tree.budget_usd is None:
        return None
    await db.refresh(tree)
    return max(0.0, tree.budget_usd - tree.spend_usd)


async def release_admission(db: AsyncSession, *, session: Session) -> None:
    """Undo :func:`admit_child` for a child whose creation failed (counts nothing)."""
    await db.exec(
        update(SpawnTree)
        .where(col(SpawnTree.root_id) == session.root_id)
        .values(
            sessions_created=col(SpawnTree.sessions_created) - 1,
            live_sessions=col(SpawnTree.live_sessions) - 1,
        )
    )
    if session.parent_session_id:
        await db.exec(
            update(Session)
            .where(col(Session.id) == session.parent_session_id)
            .values(live_children=col(Session.live_children) - 1)
        )


async def end_session(
    db: AsyncSession, session: Session, status: SessionStatus, error: str | None = None
) -> bool:
    """Move an open (live or paused) session to stopped/failed and release its live counters,
    exactly once.

    Returns False (and changes nothing) when the session had already ended. The caller commits.
    """
    await lock_tree(db, session.root_id)
    # The session's model-proxy credential dies with it.
    values: dict[str, object] = {
        "status": status,
        "last_activity": utcnow(),
        "proxy_key_hash": None,
    }
    if error is not None:
        values["error"] = error
    flipped = await _bump(
        db,
        update(Session)
        .where(col(Session.id) == session.id)
        .where(col(Session.status).in_(OPEN))
        .values(**values),
    )
    if flipped:
        await db.exec(
            update(SpawnTree)
            .where(col(SpawnTree.root_id) == session.root_id)
            .values(live_sessions=col(SpawnTree.live_sessions) - 1)
        )
        if session.parent_session_id:
            await db.exec(
                update(Session)
                .where(col(Session.id) == session.parent_session_id)
                .values(live_children=col(Session.live_children) - 1)
            )
    await db.refresh(session)
    return flipped


async def add_spend(db: AsyncSession, *, root_id: str, delta_usd: float) -> None:
    """Roll a session's new spend up into its tree."""
    if delta_usd:
        await db.exec(
            update(SpawnTree)
            .where(col(SpawnTree.root_id) == root_id)
            .values(spend_usd=col(SpawnTree.spend_usd) + delta_usd)
        )


async def cancel_open_turns(
    db: AsyncSession,
    session_id: str,
    *,
    running: TurnStatus = TurnStatus.INTERRUPTED,
    reason: str = "stopped",
) -> int:
    """Finalise the turns of an ending session that never got a result: queued ones become
    ``cancelled``, a running one becomes ``running`` (interrupted by default) with
    ``terminal_reason`` = ``reason``. Deterministic whatever the timing. Returns how many."""
    rows = await db.exec(
        select(Turn).where(
            Turn.session_id == session_id,
            col(Turn.status).in_([TurnStatus.QUEUED, TurnStatus.RUNNING]),
        )
    )
    now = utcnow()
    count = 0
    for turn in rows.all():
        if turn.status is TurnStatus.RUNNING:
            turn.status = running
            turn.terminal_reason = reason
            turn.is_error = True
            turn.errors = [f"the turn did not finish: {reason}"]
        else:
            turn.status = TurnStatus.CANCELLED
        turn.completed_at = now
        turn.recorded_at = now
        db.add(turn)
        count += 1
    return count
