"""FastAPI dependencies: Annotated aliases for the db handle, the caller and owned sessions."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.auth import InvalidToken, Principal, decode_token
from gateway.db.models import Session
from gateway.errors import DependencyUnavailable, Forbidden, Unauthorized
from gateway.services.sessions import SessionService

logger = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False)


async def get_db(request: Request) -> AsyncIterator[AsyncSession]:
    """A database handle for the route's own queries.

    It takes a connection only while a transaction runs (every service commits or the handle
    rolls back at the end), so holding the handle costs nothing. Routes that wait (streams,
    /wait) do not take one at all. The driver's own connection failures (asyncpg raises
    ConnectionRefusedError, not a SQLAlchemy error) become DependencyUnavailable("database").
    Closing runs after the response may have started: a connection the database dropped
    meanwhile (its ROLLBACK fails) is logged and discarded, never raised into a sent response.
    """
    db: AsyncSession = request.app.state.db_factory()
    try:
        yield db
    except (ConnectionError, TimeoutError) as exc:
        raise DependencyUnavailable("database", str(exc) or type(exc).__name__) from exc
    finally:
        try:
            await db.close()
        except (SQLAlchemyError, ConnectionError, OSError) as exc:
            logger.warning("database handle closed on a lost connection: %s", exc)


async def authorize(
    request: Request, session_id: str, user: Principal, *, allow_self: bool
) -> Session:
    """The session ``user`` may touch (see SessionService.authorize; NotFound otherwise), read
    on a short-lived handle of its own, closed before the route runs; 503 database when it is
    unreachable."""
    service: SessionService = request.app.state.sessions
    try:
        async with request.app.state.db_factory() as db:
            return await service.authorize(
                db=db, principal=user, session_id=session_id, allow_self=allow_self
            )
    except (ConnectionError, TimeoutError) as exc:
        raise DependencyUnavailable("database", str(exc) or type(exc).__name__) from exc


def get_service(request: Request) -> SessionService:
    """The process's SessionService."""
    service: SessionService = request.app.state.sessions
    return service


async def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller from ``Authorization: Bearer <jwt>``; 401 when missing or invalid, 429 when
    the user's rate limit is spent."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    try:
        principal = decode_token(credentials.credentials, key=request.app.state.jwt_key)
    except InvalidToken as exc:
        raise Unauthorized(f"invalid token: {exc}") from exc
    await request.app.state.rate_limiter.hit(principal.user)  # 429 over CCGATE_RATE_LIMIT
    return principal


DbDep = Annotated[AsyncSession, Depends(get_db)]
ServiceDep = Annotated[SessionService, Depends(get_service)]
CurrentUser = Annotated[Principal, Depends(get_principal)]


async def get_owned_session(session_id: str, request: Request, user: CurrentUser) -> Session:
    """The path's session if the caller may touch it: its owner, or a session token of one of
    its ancestors (404 otherwise, never 403: no existence leak)."""
    return await authorize(request, session_id, user, allow_self=False)


async def get_scoped_session(session_id: str, request: Request, user: CurrentUser) -> Session:
    """Like get_owned_session, and a session token may also name its own session."""
    return await authorize(request, session_id, user, allow_self=True)


def require_user_token(user: CurrentUser) -> Principal:
    """403 for session tokens (they cannot list or delete sessions)."""
    if user.session_scope is not None:
        raise Forbidden("a session token cannot list or delete sessions; use a user token")
    return user


OwnedSession = Annotated[Session, Depends(get_owned_session)]
ScopedSession = Annotated[Session, Depends(get_scoped_session)]
UserToken = Annotated[Principal, Depends(require_user_token)]
