"""The event hub's one pub/sub connection across Redis restarts, with followers racing in.

CI caught a follower's SUBSCRIBE reconnecting the connection while the reader reconnected it too:
asyncio's ``readuntil() called while another coroutine is already waiting`` RuntimeError ended
a WebSocket with a normal close. Only the reader reconnects now; this drives the race hard.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.errors import DependencyUnavailable
from gateway.services.event_hub import EventHub, Subscription
from gateway.supervisor import Supervisor
from tests.servers import RedisServer
from wrapper.protocol import live_channel


async def _receive(sub: Subscription, wanted: bytes) -> None:
    while await sub.get() != wanted:
        continue


async def test_followers_subscribing_while_redis_restarts_are_all_served(
    tmp_path: Path,
) -> None:
    redis = RedisServer(data_dir=str(tmp_path)).start()
    # The test's own publisher retries on a fresh connection, like the gateway's client.
    client = aioredis.Redis.from_url(
        redis.url, retry=Retry(NoBackoff(), 3), retry_on_error=[RedisConnectionError]
    )
    hub = EventHub(client)
    supervisor = Supervisor(on_failure=lambda name: failures.append(name))
    failures: list[str] = []
    await hub.start(supervisor)
    try:
        standing = await hub.subscribe(str(uuid.uuid4()))
        for round_ in range(6):
            redis.stop()
            redis = RedisServer(
                port=redis.port, password=redis.password, data_dir=str(tmp_path)
            ).start()
            # The first followers arrive while the old connection is still believed up.
            sids = [str(uuid.uuid4()) for _ in range(8)]
            subs = await asyncio.wait_for(asyncio.gather(*(hub.subscribe(sid) for sid in sids)), 15)
            for sid in [*sids, standing.session_id]:
                await client.publish(live_channel(sid), f"hello {round_}".encode())
            await asyncio.wait_for(
                asyncio.gather(
                    *(_receive(s, f"hello {round_}".encode()) for s in [*subs, standing])
                ),
                5,
            )
            for sub in subs:
                await hub.unsubscribe(sub)
        assert hub.channel_count == 1
        assert failures == [], "the hub's reader crashed"
    finally:
        await supervisor.close()
        await hub.close()
        await client.aclose()
        redis.stop()


async def test_a_follower_waits_for_redis_then_gets_a_bounded_error(tmp_path: Path) -> None:
    """Redis down: subscribe answers DependencyUnavailable("redis") after 5 s, not never;
    once Redis is back the hub serves again without a restart."""
    redis = RedisServer().start()
    client = aioredis.Redis.from_url(redis.url)
    hub = EventHub(client)
    supervisor = Supervisor()
    await hub.start(supervisor)
    try:
        await hub.unsubscribe(await hub.subscribe("warm"))
        redis.stop()
        started = asyncio.get_running_loop().time()
        try:
            await hub.subscribe("down")
        except DependencyUnavailable as exc:
            assert exc.dependency == "redis"
        else:
            raise AssertionError("subscribe succeeded with Redis down")
        assert asyncio.get_running_loop().time() - started < 7
        assert hub.channel_count == 0
        redis = RedisServer(port=redis.port, password=redis.password).start()
        sub = await asyncio.wait_for(hub.subscribe("back"), 10)
        await client.publish(live_channel("back"), b"again")
        await asyncio.wait_for(_receive(sub, b"again"), 5)
    finally:
        await supervisor.close()
        await hub.close()
        await client.aclose()
        redis.stop()
