"""Leases on a real Redis: one holder at a time, given up or lost with its TTL; Redis down is
an outage, not a lease."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from gateway.errors import DependencyUnavailable
from gateway.services.lease import Lease
from tests.containers import RedisContainer


async def test_one_replica_holds_a_lease_until_it_gives_it_up_or_dies(
    redis_server: RedisContainer,
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    name = f"test-{uuid.uuid4().hex[:8]}"
    first, second = Lease(client, name, ttl_s=0.5), Lease(client, name, ttl_s=0.5)
    assert await first.acquire() is True
    assert await second.acquire() is False
    assert await first.acquire() is True  # the holder extends it
    await second.release()  # not the holder: changes nothing
    assert await second.acquire() is False
    await first.release()
    assert await second.acquire() is True
    # A holder that stops extending (it died) loses the lease with its TTL.
    await asyncio.sleep(0.7)
    assert await first.acquire() is True
    await client.aclose()


async def test_an_unreachable_redis_is_reported_as_such() -> None:
    client = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    with pytest.raises(DependencyUnavailable) as caught:
        await Lease(client, "x", ttl_s=1).acquire()
    assert caught.value.dependency == "redis"
    await client.aclose()
