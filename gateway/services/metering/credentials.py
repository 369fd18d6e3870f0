"""Session credentials of the model proxy: minted at create, resolved (briefly cached) per
request. Only a credential's SHA-256 is stored (``Session.proxy_key_hash``); ``end_session``
clears it, so a credential dies with its session."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Mapping

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.services.metering import budgets
from gateway.services.metering.budgets import Grant

KEY_PREFIX = "ccgate-sk-"
"""Prefix of session credentials (so a leaked one is recognisable in logs and scanners)."""


def new_proxy_key() -> tuple[str, str]:
    """A fresh session credential and its SHA-256 hex (only the hash is stored)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, proxy_key_hash(key)


def proxy_key_hash(key: str) -> str:
    """SHA-256 hex of a credential (the lookup key in ``Session.proxy_key_hash``)."""
    return hashlib.sha256(key.encode()).hexdigest()


class GrantCache:
    """Resolved credentials, kept ``ttl_s`` seconds (≤ 10,000 entries) so a stream of model
    calls does not query the database each time. A session that ends is refused by every
    replica within ``ttl_s`` (its container is removed by then anyway); unknown credentials
    are never cached."""

    def __init__(
        self, db_factory: async_sessionmaker[AsyncSession], *, ttl_s: float, size: int = 10_000
    ) -> None:
        self._db = db_factory
        self._ttl = ttl_s
        self._size = size
        self._entries: dict[str, tuple[float, Grant]] = {}

    async def get(self, key_hash: str) -> Grant | None:
        """The grant of a credential hash (None: unknown or ended); raises on a database error."""
        now = time.monotonic()
        hit = self._entries.get(key_hash)
        if hit is not None and hit[0] > now:
            return hit[1]
        async with self._db() as db:
            grant = await budgets.resolve(db, key_hash)
        if grant is None:
            self._entries.pop(key_hash, None)
            return None
        if self._ttl > 0:
            if len(self._entries) >= self._size:
                self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
                if len(self._entries) >= self._size:
                    self._entries.pop(next(iter(self._entries)))
            self._entries[key_hash] = (now + self._ttl, grant)
        return grant


def credential_of(headers: Mapping[str, str]) -> str | None:
    """The session credential of a request (``x-api-key`` or ``Authorization: Bearer``),
    None when absent or not shaped like one."""
    key = headers.get("x-api-key")
    if not key:
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        key = value.strip() if scheme.lower() == "bearer" else None
    return key if key and key.startswith(KEY_PREFIX) and len(key) < 200 else None
