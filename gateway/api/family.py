"""Session families: spawn a child, list children, show the whole tree."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, status

from gateway.api.sessions import session_public
from gateway.deps import CurrentUser, DbDep, ScopedSession, ServiceDep
from gateway.errors import Forbidden
from gateway.schemas import ChildrenList, SpawnCreated, SpawnRequest
from gateway.services import family

router = APIRouter(prefix="/sessions/{session_id}", tags=["family"])


@router.post("/spawn", status_code=status.HTTP_201_CREATED)
async def spawn(
    body: SpawnRequest,
    parent: ScopedSession,
    user: CurrentUser,
    request: Request,
    db: DbDep,
    service: ServiceDep,
) -> SpawnCreated:
    """Start a child session in its own container; it runs ``prompt`` exactly once.

    ``workspace.type``: ``inherit`` (share the parent's workspace), ``clone`` (a copy of it
    now) or ``ephemeral``. Config not given is inherited. Limits (depth, live children, live and
    total sessions per tree, tree cost budget) are enforced atomically: a refusal is 409 naming
    the limit and its value, and no container is created.
    """
    if user.session_scope is not None and user.session_scope != parent.id:
        raise Forbidden("a session token can only spawn children of its own session")
    child = await service.spawn(db=db, parent=parent, body=body)
    return SpawnCreated(
        child_session_id=child.id,
        status=child.status.value,
        parent_session_id=parent.id,
        depth=child.depth,
        container_id=child.container_id,
    )


@router.get("/children")
async def list_children(session: ScopedSession, db: DbDep) -> ChildrenList:
    """The session's direct children, oldest first."""
    children = await family.children_of(db, session.id)
    kids = await family.child_ids_by_parent(db, [c.id for c in children])
    return ChildrenList(
        session_id=session.id,
        children=[session_public(c, kids[c.id]) for c in children],
    )


@router.get("/tree")
async def get_tree(session: ScopedSession, db: DbDep) -> dict[str, Any]:
    """The subtree under this session: status, depth, turns and cost per node, with totals
    (cost per node is its CLI's latest running total; the tree's is their sum)."""
    return await family.tree_view(db, session)
