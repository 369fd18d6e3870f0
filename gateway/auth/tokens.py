"""Mint and verify JWTs (python-jose).

Tokens are HS256 only (the algorithm is pinned on decode, so ``alg: none`` and algorithm
confusion fail), must carry ``sub`` (the user id) and ``exp``; ``iat`` is set on mint.

A *session token* also carries ``ccgate_session``: the gateway mints one for each container (the
ccgate MCP tools use it) and it reaches only that session's subtree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from jose import JWTError, jwt

JWT_ALGORITHM = "HS256"
"""The only algorithm tokens may use; pinned on decode (``alg: none`` and RS/HS confusion fail)."""

SESSION_CLAIM = "ccgate_session"


class InvalidToken(Exception):
    """The token is missing, malformed, expired, badly signed or lacks a claim."""


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: ``user`` is the token's ``sub``; ``session_scope`` is set for a
    session token (the session whose subtree it may touch)."""

    user: str
    session_scope: str | None = None


def mint_token(
    *,
    key: str,
    user: str,
    ttl_s: int,
    now: float | None = None,
    session_scope: str | None = None,
) -> str:
    """A signed token for ``user`` valid for ``ttl_s`` seconds (scoped to a session's subtree
    when ``session_scope`` is given)."""
    if not user or len(user) > 255:
        raise ValueError("user must be 1-255 characters")
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    issued = int(now if now is not None else time.time())
    claims: dict[str, object] = {"sub": user, "iat": issued, "exp": issued + ttl_s}
    if session_scope is not None:
        claims[SESSION_CLAIM] = session_scope
    return str(jwt.encode(claims, key, algorithm=JWT_ALGORITHM))


def decode_token(token: str, *, key: str) -> Principal:
    """Verify signature, algorithm and expiry; raises InvalidToken saying what is wrong."""
    try:
        header = jwt.get_unverified_header(token)
    except JWTError as exc:
        raise InvalidToken("malformed token") from exc
    if header.get("alg") != JWT_ALGORITHM:
        raise InvalidToken(f"token algorithm must be {JWT_ALGORITHM}")
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[JWT_ALGORITHM],
            options={"require_exp": True, "require_sub": True, "verify_aud": False},
        )
    except JWTError as exc:
        raise InvalidToken(str(exc) or "invalid token") from exc
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 255:
        raise InvalidToken("token has no subject (or one longer than 255 characters)")
    scope = claims.get(SESSION_CLAIM)
    if scope is not None and (not isinstance(scope, str) or not scope):
        raise InvalidToken("malformed session scope")
    return Principal(user=sub, session_scope=scope)
