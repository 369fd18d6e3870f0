"""FastAPI dependencies: Annotated aliases for the db handle, the caller and owned sessions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.auth import InvalidToken, Principal, decode_token
from gateway.db.models import Session
from gateway.errors import DependencyUnavailable, Forbidden
from gateway.services.sessions import SessionService

_bearer = HTTPBearer(auto_error=False)


class Unauthorized(Exception):
    """No valid bearer token (mapped to 401 with ``WWW-Authenticate: Bearer``)."""


async def get_db(request: Request) -> AsyncIterator[AsyncSession]:
    """One database handle per request.

    The driver's own connection failures (asyncpg raises ConnectionRefusedError, not a
    SQLAlchemy error) become DependencyUnavailable("database"); other dependencies translate
    their OSErrors themselves before they get here.
    """
    async with request.app.state.db_factory() as db:
        try:
            yield db
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
    """The caller from ``Authorization: Bearer <jwt>``; 401 when missing or invalid."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    try:
        return decode_token(credentials.credentials, key=request.app.state.jwt_key)
    except InvalidToken as exc:
        raise Unauthorized(f"invalid token: {exc}") from exc


DbDep = Annotated[AsyncSession, Depends(get_db)]
ServiceDep = Annotated[SessionService, Depends(get_service)]
CurrentUser = Annotated[Principal, Depends(get_principal)]


async def get_owned_session(
    session_id: str, db: DbDep, user: CurrentUser, service: ServiceDep
) -> Session:
    """The path's session if the caller may touch it: its owner, or a session token of one of
    its ancestors (404 otherwise, never 403: no existence leak)."""
    return await service.authorize(db=db, principal=user, session_id=session_id, allow_self=False)


async def get_scoped_session(
    session_id: str, db: DbDep, user: CurrentUser, service: ServiceDep
) -> Session:
    """Like get_owned_session, and a session token may also name its own session."""
    return await service.authorize(db=db, principal=user, session_id=session_id, allow_self=True)


def require_user_token(user: CurrentUser) -> Principal:
    """403 for session tokens (they cannot list or delete sessions)."""
    if user.session_scope is not None:
        raise Forbidden("a session token cannot list or delete sessions; use a user token")
    return user


OwnedSession = Annotated[Session, Depends(get_owned_session)]
ScopedSession = Annotated[Session, Depends(get_scoped_session)]
UserToken = Annotated[Principal, Depends(require_user_token)]
