"""Queries over session trees: children, descendants, and the tree view with its totals."""

from __future__ import annotations

from typing import Any

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db.models import Session, SpawnTree


async def children_of(db: AsyncSession, session_id: str) -> list[Session]:
    """Direct children, oldest first."""
    rows = await db.exec(
        select(Session)
        .where(Session.parent_session_id == session_id)
        .order_by(col(Session.created_at))
    )
    return list(rows.all())


async def child_ids_by_parent(db: AsyncSession, parent_ids: list[str]) -> dict[str, list[str]]:
    """Children ids (oldest first) of each of ``parent_ids``, in one query."""
    out: dict[str, list[str]] = {pid: [] for pid in parent_ids}
    if parent_ids:
        rows = await db.exec(
            select(Session.id, Session.parent_session_id)
            .where(col(Session.parent_session_id).in_(parent_ids))
            .order_by(col(Session.created_at))
        )
        for child_id, parent_id in rows.all():
            out[str(parent_id)].append(child_id)
    return out


async def is_descendant(db: AsyncSession, *, ancestor_id: str, session: Session) -> bool:
    """True when ``session`` is below ``ancestor_id`` (not the ancestor itself)."""
    parent_id = session.parent_session_id
    for _ in range(64):  # deeper than any allowed tree
        if parent_id is None:
            return False
        if parent_id == ancestor_id:
            return True
        parent = await db.get(Session, parent_id)
        parent_id = parent.parent_session_id if parent is not None else None
    return False


async def subtree(db: AsyncSession, root: Session) -> list[Session]:
    """``root`` and every session below it, parents before children (breadth first)."""
    rows = await db.exec(select(Session).where(Session.root_id == root.root_id))
    by_parent: dict[str | None, list[Session]] = {}
    for row in rows.all():
        by_parent.setdefault(row.parent_session_id, []).append(row)
    ordered, frontier = [root], [root]
    while frontier:
        nxt: list[Session] = []
        for node in frontier:
            kids = sorted(by_parent.get(node.id, []), key=lambda s: s.created_at)
            ordered.extend(kids)
            nxt.extend(kids)
        frontier = nxt
    return ordered


async def tree_view(db: AsyncSession, root: Session) -> dict[str, Any]:
    """Nested nodes ``{session_id, status, depth, total_turns, total_cost_usd, children}`` under
    ``root``, with totals summed over the nodes (each node's cost is the latest running total
    from its own result events), and the tree's limits counters."""
    nodes = await subtree(db, root)
    views: dict[str, dict[str, Any]] = {}
    for node in nodes:
        views[node.id] = {
            "session_id": node.id,
            "parent_session_id": node.parent_session_id,
            "status": node.status.value,
            "depth": node.depth,
            "total_turns": node.total_turns,
            "total_cost_usd": node.total_cost_usd,
            "children": [],
        }
        if node is not root and node.parent_session_id in views:
            views[node.parent_session_id]["children"].append(views[node.id])
    counters = await db.get(SpawnTree, root.root_id)
    return {
        "tree": views[root.id],
        "totals": {
            "sessions": len(nodes),
            "live_sessions": sum(1 for n in nodes if n.status.open),
            "total_turns": sum(n.total_turns for n in nodes),
            "total_cost_usd": sum(n.total_cost_usd for n in nodes),
        },
        "tree_counters": None
        if counters is None
        else {
            "root_session_id": counters.root_id,
            "sessions_created": counters.sessions_created,
            "live_sessions": counters.live_sessions,
            "spend_usd": counters.spend_usd,
            "budget_usd": counters.budget_usd,
        },
    }
