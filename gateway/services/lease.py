"""Leases: one replica at a time runs a periodic task (the lifecycle loop, the reaper's sweep).

A lease is a Redis string at ``lease_key(name)`` holding the holder's id, with a TTL. Taking
it is ``SET NX PX``; keeping it is a compare-and-extend script (only the holder extends it);
giving it up is compare-and-delete. A holder that dies loses the lease when its TTL runs out,
and the next replica to try takes it. Redis down -> nobody holds it (the tasks wait; a
periodic task missing a few rounds is the designed outcome, two replicas fighting is not).
"""

from __future__ import annotations

import uuid

import redis.asyncio as aioredis

from gateway.services.session_redis import redis_errors
from wrapper.protocol import lease_key

_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    """A named lease held for ``ttl_s`` seconds at a time by this process."""

    def __init__(self, redis: aioredis.Redis, name: str, *, ttl_s: float) -> None:
        self._redis = redis
        self._key = lease_key(name)
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self.holder = uuid.uuid4().hex

    async def acquire(self) -> bool:
        """Take the lease, or extend it if this process holds it. True while held. Raises
        DependencyUnavailable("redis")."""
        with redis_errors():
            if await self._redis.eval(_EXTEND, 1, self._key, self.holder, self._ttl_ms):
                return True
            return bool(await self._redis.set(self._key, self.holder, nx=True, px=self._ttl_ms))

    async def release(self) -> None:
        """Give the lease up if this process holds it."""
        with redis_errors():
            await self._redis.eval(_RELEASE, 1, self._key, self.holder)
