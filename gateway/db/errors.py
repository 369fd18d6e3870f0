"""Which database errors are outages (retry, 503) and which are bugs or bad data (500)."""

from __future__ import annotations

from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` means the database is unreachable, overloaded or busy: connection
    refused or lost, pool exhausted, SQLite locked. Such work is retried later (or answered
    503); any other database error is a bug or bad data and is not retried blindly."""
    if isinstance(exc, OSError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, PoolTimeoutError | DisconnectionError | OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)
