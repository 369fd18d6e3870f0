"""Session resource: create, list, read, stop, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status

from gateway.db.models import Session, SessionStatus, as_utc
from gateway.deps import CurrentUser, DbDep, OwnedSession, ServiceDep, UserToken
from gateway.schemas import (
    SessionCreate,
    SessionCreated,
    SessionList,
    SessionPublic,
    WorkspacePublic,
)
from gateway.services import family
from gateway.services.mcp_profiles import PROFILE_SERVERS_KEY

router = APIRouter(prefix="/sessions", tags=["sessions"])


def websocket_url(request: Request, session_id: str) -> str:
    """ws(s)://host/api/v1/sessions/{id}/stream for the request's own host."""
    scheme = "wss" if request.url.scheme == "https" else "ws"
    return f"{scheme}://{request.url.netloc}/api/v1/sessions/{session_id}/stream"


def session_public(session: Session, child_ids: list[str]) -> SessionPublic:
    """The API view of a session row."""
    return SessionPublic(
        session_id=session.id,
        status=session.status.value,
        container_id=session.container_id,
        created_at=as_utc(session.created_at) or session.created_at,
        last_activity=as_utc(session.last_activity) or session.last_activity,
        parent_session_id=session.parent_session_id,
        child_session_ids=child_ids,
        total_cost_usd=session.total_cost_usd,
        total_turns=session.total_turns,
        usage=session.usage,
        workspace=WorkspacePublic(type=session.workspace_type, id=session.workspace_id),
        depth=session.depth,
        root_session_id=session.root_id,
        config={k: v for k, v in session.config.items() if k != PROFILE_SERVERS_KEY},
        cli_session_id=session.cli_session_id,
        error=session.error,
        paused_reason=session.paused_reason,
        idle_timeout_s=session.idle_timeout_s,
        expires_at=as_utc(session.expires_at),
        queue_position=session.queue_position,
    )


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_session(
    body: SessionCreate,
    request: Request,
    db: DbDep,
    user: CurrentUser,
    service: ServiceDep,
    queue: Annotated[bool, Query(description="wait in the admission queue, not 429")] = False,
) -> SessionCreated:
    """Start a session: its own container running the Claude Code CLI.

    Returns at once with status ``starting``; the ``ready`` event (and status ``idle``) follows
    when the CLI answered its handshake. Chats sent before then are queued. With
    ``parent_session_id`` the session is a child of that one, under the spawn limits (409).
    Over an admission limit: 429 with Retry-After naming the limit — or, with ``?queue=true``
    (or ``queue`` in the body), status ``queued`` and its ``queue_position``; it starts when
    room frees, fairly across users.
    """
    session = await service.create_session(
        db=db, principal=user, body=body, queue=queue or body.queue
    )
    return SessionCreated(
        session_id=session.id,
        status=session.status.value,
        container_id=session.container_id,
        created_at=as_utc(session.created_at) or session.created_at,
        websocket_url=websocket_url(request, session.id),
        queue_position=session.queue_position,
    )


@router.get("")
async def list_sessions(
    db: DbDep,
    user: UserToken,
    service: ServiceDep,
    status_filter: Annotated[SessionStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> SessionList:
    """The caller's sessions, newest first."""
    rows, total = await service.list_sessions(
        db=db, owner=user.user, status=status_filter, limit=limit, offset=offset
    )
    kids = await family.child_ids_by_parent(db, [s.id for s in rows])
    return SessionList(
        sessions=[session_public(s, kids[s.id]) for s in rows],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.get("/{session_id}")
async def get_session(session: OwnedSession, db: DbDep, service: ServiceDep) -> SessionPublic:
    """Status, container, totals (cost, turns, usage) and family of one session."""
    return session_public(session, await service.child_ids(db=db, session_id=session.id))


@router.post("/{session_id}/stop")
async def stop_session(session: OwnedSession, db: DbDep, service: ServiceDep) -> SessionPublic:
    """Stop the session and its whole subtree: each container gets SIGTERM, then SIGKILL after
    the grace period, and is removed. Volumes, events and artifacts are kept until DELETE.
    """
    session = await service.stop(db=db, session=session)
    return session_public(session, await service.child_ids(db=db, session_id=session.id))


@router.post("/{session_id}/pause")
async def pause_session(session: OwnedSession, db: DbDep, service: ServiceDep) -> SessionPublic:
    """Release the session's container now, as its idle timeout would (status ``paused``,
    ``paused_reason: requested``): volumes, transcript, events and artifacts stay, and the
    next prompt (or ``POST /resume``) continues the conversation in a new container. 409 when
    a turn is queued or running, or the session is starting or ended."""
    session = await service.pause(db=db, session=session, reason="requested")
    return session_public(session, await service.child_ids(db=db, session_id=session.id))


@router.post("/{session_id}/resume")
async def resume_session(session: OwnedSession, db: DbDep, service: ServiceDep) -> SessionPublic:
    """Start a new container for a paused session (``claude --resume``): status ``starting``,
    then ``ready`` (``resumed: true``, ``resume_ms``) on the stream. A live session is returned
    unchanged; 409 when it has ended; 503 naming the dependency when one fails (the session
    stays paused)."""
    session = await service.resume(db=db, session=session)
    return session_public(session, await service.child_ids(db=db, session_id=session.id))


@router.delete("/{session_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_session(
    session: OwnedSession, user: UserToken, request: Request, db: DbDep, service: ServiceDep
) -> Response:
    """Stop and delete the session and its subtree: containers, volumes, events, artifacts.
    A deleted child is detached from its parent."""
    await service.delete(db=db, session=session)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
