"""Metered usage: per user per day, and per session request by request."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from gateway.deps import CurrentUser, DbDep, ScopedSession
from gateway.errors import Forbidden
from gateway.schemas import SessionUsage, UsageReport
from gateway.services import usage

router = APIRouter(tags=["usage"])


@router.get("/usage")
async def daily(
    user: CurrentUser,
    request: Request,
    db: DbDep,
    days: Annotated[int, Query(ge=1, le=366)] = 30,
    of: Annotated[str | None, Query(alias="user", min_length=1, max_length=255)] = None,
) -> UsageReport:
    """Tokens and cost the model proxy metered for the caller per UTC day (newest first).

    Operators (``CCGATE_OPERATORS``) may ask for another user with ``?user=``; anyone else
    gets 403 for a user other than themselves, and a session token (a container's) 403.
    """
    settings = request.app.state.settings
    if user.session_scope is not None:
        raise Forbidden(
            "a session token reaches only its own subtree: use GET /sessions/{id}/usage"
        )
    target = of or user.user
    if target != user.user and user.user not in settings.operators:
        raise Forbidden("only an operator (CCGATE_OPERATORS) may read another user's usage")
    return await usage.daily_usage(
        db, user=target, days=days, daily_budget_usd=settings.user_daily_budget_usd
    )


@router.get("/sessions/{session_id}/usage")
async def of_session(
    session: ScopedSession,
    db: DbDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> SessionUsage:
    """The session's model requests as metered by the proxy (oldest first), with totals."""
    return await usage.session_usage(db, session, limit=limit)
