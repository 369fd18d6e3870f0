"""The gateway side of a session's Redis keys: spec, ACL user, input and control queues."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from gateway.errors import DependencyUnavailable
from gateway.services.envelopes import sign_notice
from wrapper.protocol import (
    LEDGER_GROUP,
    Claim,
    ControlMessage,
    ControlType,
    EventType,
    SessionSpec,
    TurnRequest,
    claim_key,
    control_key,
    events_key,
    input_key,
    live_channel,
    pool_claims_key,
    pool_ready_key,
    redis_username,
    session_prefix,
    spec_key,
    token_key,
)

# What a session container may do, command by command: exactly what the wrapper needs, on its own
# keys and channels. Nothing that enumerates (SCAN, KEYS, RANDOMKEY, PUBSUB CHANNELS: key patterns
# do not filter those), nothing administrative. Scripts run with these same rights.
SESSION_COMMANDS = (
    # connecting (redis-py sends these itself; its CLIENT SETINFO, unknown to Redis 7.0, may fail)
    "+auth",
    "+hello",
    "+ping",
    "+client|setname",
    "+select",
    "+quit",
    "+reset",
    # the spec and the session token
    "+get",
    # turns and control messages
    "+blpop",
    # events: the append-and-publish script, and where a restarted wrapper continues
    "+evalsha",
    "+eval",
    "+script|load",
    "+script|exists",
    "+xadd",
    "+publish",
    "+xrevrange",
)


def acl_password(secret: str, session_id: str) -> str:
    """The session's Redis password, derived from the gateway secret (HMAC-SHA256), so the ACL
    user can be re-created after a Redis restart that lost it (ACL rules are not in the AOF)."""
    return hmac.new(secret.encode(), f"redis-acl:{session_id}".encode(), hashlib.sha256).hexdigest()


async def ensure_acl_user(
    client: aioredis.Redis, session_id: str, password: str, *, pool: bool = False
) -> bool:
    """Create the session's ACL user if it is missing (``pool``: with a warm-pool container's
    readiness right); True when it had to be created."""
    with redis_errors():
        if await client.acl_getuser(redis_username(session_id)) is not None:
            return False
        await _set_acl_user(client, session_id, password, pool=pool)
    return True


async def count_claim(client: aioredis.Redis, profile: str) -> None:
    """Count a claim of ``profile`` in the last-minute counter (best effort)."""
    key = pool_claims_key(profile)
    with suppress(RedisError, OSError):
        async with client.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, 60, nx=True)
            await pipe.execute()


def _acl_rules(session_id: str, password: str, *, pool: bool = False) -> dict[str, Any]:
    """ACL SETUSER arguments of a session's user (redis-py's keyword form)."""
    prefix = session_prefix(session_id)
    return {
        "enabled": True,
        "reset": True,
        "passwords": [f"+{password}"],
        "keys": [f"{prefix}*"],
        "channels": [f"{prefix}*"],
        "categories": ["-@all"],
        "commands": list(SESSION_COMMANDS),
        # A warm-pool container reports readiness with RPUSH on that one key (a selector:
        # Redis >= 7.0); it may not push onto its own input or control lists.
        "selectors": [("+rpush", pool_ready_key(session_id))] if pool else None,
    }


async def _set_acl_user(
    client: aioredis.Redis, session_id: str, password: str, *, pool: bool = False
) -> None:
    await client.acl_setuser(
        redis_username(session_id), **_acl_rules(session_id, password, pool=pool)
    )


@contextmanager
def redis_errors() -> Iterator[None]:
    """Translate Redis failures into DependencyUnavailable("redis", ...)."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise DependencyUnavailable("redis", str(exc) or type(exc).__name__) from exc


async def provision(
    client: aioredis.Redis,
    spec: SessionSpec,
    *,
    acl_secret: str | None,
    token: str | None = None,
    token_ttl_s: int = 3600,
) -> tuple[str | None, str | None]:
    """Write the spec (and the session token), create the ledger's consumer group and (given
    ``acl_secret``) the session's ACL user, whose password is :func:`acl_password`.

    Returns (username, password) for the container, or (None, None) without ACL.
    Raises DependencyUnavailable("redis", ...).
    """
    sid = spec.session_id
    password = acl_password(acl_secret, sid) if acl_secret is not None else None
    with redis_errors():
        # One round trip: the writes do not depend on each other.
        async with client.pipeline(transaction=False) as pipe:
            pipe.set(spec_key(sid), spec.to_json())
            if token is not None:
                pipe.set(token_key(sid), token, ex=token_ttl_s)
            pipe.xgroup_create(events_key(sid), LEDGER_GROUP, id="0", mkstream=True)
            if password is not None:
                pipe.acl_setuser(redis_username(sid), **_acl_rules(sid, password, pool=spec.pooled))
            replies = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                raise reply
    if password is None:
        return None, None
    return redis_username(sid), password


async def ensure_ledger_group(client: aioredis.Redis, session_id: str) -> None:
    """Create the ledger consumer group on the session's stream (from seq 0; idempotent)."""
    try:
        await client.xgroup_create(events_key(session_id), LEDGER_GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def revoke_access(client: aioredis.Redis, session_id: str) -> None:
    """Delete the session's ACL user and disconnect its clients (the container is gone)."""
    with redis_errors(), suppress(ResponseError):  # no such user: nothing to revoke
        await client.acl_deluser(redis_username(session_id))


async def purge(client: aioredis.Redis, session_id: str) -> None:
    """Delete every key of the session and its ACL user."""
    await revoke_access(client, session_id)
    with redis_errors():
        await client.delete(
            spec_key(session_id),
            input_key(session_id),
            control_key(session_id),
            events_key(session_id),
            token_key(session_id),
            claim_key(session_id),
            pool_ready_key(session_id),
        )


async def push_claim(client: aioredis.Redis, claim: Claim) -> None:
    """Hand a warm-pool container its session (the wrapper BLPOPs the claim key)."""
    with redis_errors():
        await client.rpush(claim_key(claim.session_id), claim.to_json())


async def wait_claim_taken(client: aioredis.Redis, session_id: str, timeout_s: float) -> bool:
    """Poll (every 2 ms) until the claimed pool container published its first event — proof
    that its wrapper is alive and bound (an empty claim list is not: Redis hands a BLPOP'd item
    to a frozen client too); False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    with redis_errors():
        while not await client.xlen(events_key(session_id)):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.002)
    return True


async def drop_claim(client: aioredis.Redis, session_id: str) -> None:
    """Delete a claim no container took."""
    with redis_errors():
        await client.delete(claim_key(session_id))


async def wait_pool_ready(client: aioredis.Redis, slot_id: str, timeout_s: float) -> bool:
    """Wait for a warm-pool container's wrapper to report its CLI ready; False on timeout.
    ``client`` must allow a blocking read of ``timeout_s`` (socket timeout above it)."""
    with redis_errors():
        item = await client.blpop([pool_ready_key(slot_id)], timeout=timeout_s)
    return item is not None


async def push_turn(client: aioredis.Redis, session_id: str, request: TurnRequest) -> None:
    """Queue a prompt for the wrapper (RPUSH keeps arrival order)."""
    with redis_errors():
        await client.rpush(input_key(session_id), request.to_json())


async def requeue_turns(
    client: aioredis.Redis, session_id: str, requests: list[TurnRequest]
) -> None:
    """Replace the session's input list with ``requests`` (a resumed session: the database's
    queued turns, oldest first, are the truth; whatever the dead container left is dropped)."""
    with redis_errors():
        async with client.pipeline(transaction=True) as pipe:
            pipe.delete(input_key(session_id))
            if requests:
                pipe.rpush(input_key(session_id), *(r.to_json() for r in requests))
            await pipe.execute()


async def drain_turns(client: aioredis.Redis, session_id: str) -> list[TurnRequest]:
    """Remove and return prompts the wrapper never took (the session is stopping)."""
    with redis_errors():
        async with client.pipeline(transaction=True) as pipe:
            pipe.lrange(input_key(session_id), 0, -1)
            pipe.delete(input_key(session_id))
            raw, _ = await pipe.execute()
    return [TurnRequest.from_json(item) for item in raw]


async def store_token(client: aioredis.Redis, session_id: str, token: str, ttl_s: int) -> None:
    """Replace the session's token (renewal); it expires with the token."""
    with redis_errors():
        await client.set(token_key(session_id), token, ex=ttl_s)


async def token_ttl(client: aioredis.Redis, session_id: str) -> int:
    """Seconds left on the session's stored token (negative when missing)."""
    with redis_errors():
        return int(await client.ttl(token_key(session_id)))


async def notify(
    client: aioredis.Redis,
    session_id: str,
    event: EventType,
    data: dict[str, Any],
    *,
    key: bytes,
) -> None:
    """Ask a session's wrapper to publish a child_* event in its stream (best effort: a
    stopped session has no reader, and its keys go with it). ``data`` is signed with ``key``
    (envelopes.py: the ledger refuses a gateway event without the signature)."""
    signed = sign_notice(key, session_id, event.value, data)
    message = ControlMessage(type=ControlType.NOTIFY, event=event.value, data=signed)
    with redis_errors():
        await client.rpush(control_key(session_id), message.to_json())


def ledger_group(groups: list[dict[Any, Any]]) -> dict[Any, Any] | None:
    """The ``ccgate-ledger`` entry of an ``XINFO GROUPS`` reply (None when absent)."""
    for group in groups:
        name = group.get("name")
        if (name.decode() if isinstance(name, bytes) else name) == LEDGER_GROUP:
            return group
    return None


def group_backlog(group: dict[Any, Any] | None) -> int:
    """Entries the ledger has not persisted yet, from its ``XINFO GROUPS`` entry: read but
    not acknowledged (``pending``) plus not read (Redis 7 ``lag``)."""
    if group is None:
        return 0
    return int(group.get("pending") or 0) + int(group.get("lag") or 0)


async def unpersisted(client: aioredis.Redis, session_id: str) -> int:
    """:func:`group_backlog` of the session's stream; 0 when the stream or group is gone."""
    with redis_errors():
        try:
            groups = await client.xinfo_groups(events_key(session_id))
        except ResponseError:
            return 0
    return group_backlog(ledger_group(groups))


def turn_recorded_notice(session_id: str, message_id: str) -> bytes:
    """The non-envelope notice (no ``seq``) that a turn's result and artifacts are recorded."""
    return json.dumps(
        {"type": "turn_recorded", "session_id": session_id, "message_id": message_id},
        separators=(",", ":"),
    ).encode()


async def announce_turn_recorded(client: aioredis.Redis, session_id: str, message_id: str) -> None:
    """Publish :func:`turn_recorded_notice` on the session's live channel, so waiters and
    clients wake at once (it is a hint: the database is the truth)."""
    with redis_errors():
        await client.publish(live_channel(session_id), turn_recorded_notice(session_id, message_id))


async def announce_turn_silent(
    client: aioredis.Redis, session_id: str, message_id: str, silent_s: float
) -> None:
    """Publish the notice ``{"type":"turn_silent","session_id","message_id","silent_s"}``: the
    running turn produced no event for ``silent_s`` seconds (the no-output watchdog)."""
    notice = {
        "type": "turn_silent",
        "session_id": session_id,
        "message_id": message_id,
        "silent_s": round(silent_s, 1),
    }
    with redis_errors():
        await client.publish(live_channel(session_id), json.dumps(notice, separators=(",", ":")))


async def announce_queue_position(client: aioredis.Redis, session_id: str, position: int) -> None:
    """Publish ``{"type":"queue_position","session_id","position"}``: the session waits for
    admission at that 1-based place."""
    notice = {"type": "queue_position", "session_id": session_id, "position": position}
    with redis_errors():
        await client.publish(live_channel(session_id), json.dumps(notice, separators=(",", ":")))


async def push_control(client: aioredis.Redis, session_id: str, message: ControlMessage) -> None:
    """Send a control message (interrupt) to the wrapper."""
    with redis_errors():
        await client.rpush(control_key(session_id), message.to_json())


__all__ = [
    "acl_password",
    "announce_turn_recorded",
    "drain_turns",
    "ensure_acl_user",
    "ensure_ledger_group",
    "group_backlog",
    "ledger_group",
    "notify",
    "provision",
    "purge",
    "push_control",
    "push_turn",
    "revoke_access",
    "store_token",
    "token_ttl",
    "turn_recorded_notice",
    "unpersisted",
]
