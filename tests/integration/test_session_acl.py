"""A session container's Redis user reaches its own keys and nothing else."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, ResponseError

from gateway.services import session_redis
from tests.containers import RedisContainer
from wrapper.protocol import SessionSpec, events_key, input_key, live_channel, spec_key


async def test_a_session_user_is_confined_to_its_own_keys_and_channels(
    redis_server: RedisContainer,
) -> None:
    admin = aioredis.Redis.from_url(redis_server.url)
    mine, theirs = str(uuid.uuid4()), str(uuid.uuid4())
    user, password = await session_redis.provision(
        admin, SessionSpec(session_id=mine), acl_secret="gateway-secret"
    )
    await session_redis.provision(admin, SessionSpec(session_id=theirs), acl_secret=None)
    assert password == session_redis.acl_password("gateway-secret", mine)
    assert user is not None
    container = aioredis.Redis(
        host="127.0.0.1", port=redis_server.port, username=user, password=password
    )
    assert await container.get(spec_key(mine)) is not None
    await container.xadd(events_key(mine), {"e": "{}"}, id="1-0")
    await container.publish(live_channel(mine), "{}")
    await container.blpop([input_key(mine)], timeout=0.1)
    with pytest.raises(NoPermissionError):
        await container.get(spec_key(theirs))
    with pytest.raises(NoPermissionError):
        await container.publish(live_channel(theirs), "{}")
    with pytest.raises(NoPermissionError):
        await container.keys("*")
    with pytest.raises(NoPermissionError):
        await container.flushall()
    # Key patterns do not filter enumeration: these would list other tenants' sessions.
    for enumerate_ in (
        container.scan(0, match="ccgate:*"),
        container.randomkey(),
        container.pubsub_channels(),
        container.execute_command("PUBSUB", "NUMPAT"),
        container.acl_list(),
        container.config_get("*"),
        container.info(),
        container.client_list(),
    ):
        with pytest.raises(NoPermissionError):
            await enumerate_
    # A script runs with the same rights: no way around the list through EVAL.
    with pytest.raises(ResponseError, match="can't run this command"):
        await container.eval("return redis.call('SCAN', '0')", 0)
    await container.aclose()

    # Redis lost its ACL rules (a restart): the same credentials work once re-created.
    await admin.acl_deluser(user)
    assert await session_redis.ensure_acl_user(admin, mine, password) is True
    assert await session_redis.ensure_acl_user(admin, mine, password) is False
    again = aioredis.Redis(
        host="127.0.0.1", port=redis_server.port, username=user, password=password
    )
    assert await again.get(spec_key(mine)) is not None
    await again.aclose()

    await session_redis.purge(admin, mine)
    assert await admin.exists(spec_key(mine), events_key(mine)) == 0
    assert user not in await admin.acl_users()
    await session_redis.purge(admin, theirs)
    await admin.aclose()
