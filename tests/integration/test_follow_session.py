"""Replay-then-live delivery: every event once, in order, while publishing races the reader."""

from __future__ import annotations

import asyncio
import json
import uuid

import redis.asyncio as aioredis

from gateway.services.event_hub import EventHub
from gateway.services.events import envelope_seq, follow_session
from gateway.supervisor import Supervisor
from tests.containers import RedisContainer
from wrapper.protocol import EventSource, encode_envelope
from wrapper.publisher import EventPublisher


async def _no_archive(session_id: str, first: int, last: int, limit: int) -> list[bytes]:
    return []


async def test_followers_joining_mid_stream_get_every_event_once_in_order(
    redis_server: RedisContainer,
) -> None:
    sid = str(uuid.uuid4())
    client = aioredis.Redis.from_url(redis_server.url)
    hub = EventHub(client)
    supervisor = Supervisor()
    await hub.start(supervisor)
    publisher = EventPublisher(client, sid)
    await publisher.start()
    total = 2000

    async def produce() -> None:
        for n in range(total):
            publisher.emit("x", json.dumps({"n": n}), source=EventSource.CLI, turn_id=None)
            if n % 50 == 0:
                await asyncio.sleep(0.001)

    async def follow(after: int) -> list[int]:
        seen: list[int] = []
        async for raw in follow_session(hub, client, sid, after_seq=after, archive=_no_archive):
            seen.append(envelope_seq(raw))
            if seen[-1] == total:
                return seen
        return seen

    producer = asyncio.create_task(produce())
    followers = []
    for after in (0, 0, 5, 100):
        followers.append(asyncio.create_task(follow(after)))
        await asyncio.sleep(0.01)
    results = await asyncio.wait_for(asyncio.gather(*followers), 30)
    await producer
    for after, seen in zip((0, 0, 5, 100), results, strict=True):
        assert seen == list(range(after + 1, total + 1))
    assert hub.channel_count == 0
    await publisher.close(1)
    await supervisor.close()
    await hub.close()
    await client.aclose()


async def test_events_trimmed_from_redis_come_from_the_archive_or_as_an_explicit_gap(
    redis_server: RedisContainer,
) -> None:
    sid = str(uuid.uuid4())
    client = aioredis.Redis.from_url(redis_server.url)
    hub = EventHub(client)
    supervisor = Supervisor()
    await hub.start(supervisor)
    stream = f"ccgate:session:{sid}:events"
    for seq in range(1, 11):
        raw = encode_envelope(
            seq=seq, session_id=sid, turn_id=None, event_type="x", data_json="{}",
            source=EventSource.CLI,
        )  # fmt: skip
        await client.xadd(stream, {"e": raw}, id=f"{seq}-0")
    await client.xtrim(stream, minid="6-0", approximate=False)

    archived = {
        seq: encode_envelope(
            seq=seq,
            session_id=sid,
            turn_id=None,
            event_type="x",
            data_json="{}",
            source=EventSource.CLI,
        ).encode()
        for seq in range(3, 6)
    }

    async def archive(session_id: str, first: int, last: int, limit: int) -> list[bytes]:
        return [archived[s] for s in range(first, last + 1) if s in archived][:limit]

    async def take(after: int, count: int) -> list[bytes]:
        out: list[bytes] = []
        async for raw in follow_session(hub, client, sid, after_seq=after, archive=archive):
            out.append(raw)
            if len(out) == count:
                break
        return out

    from_archive = await asyncio.wait_for(take(2, 8), 5)
    assert [envelope_seq(r) for r in from_archive] == list(range(3, 11))
    with_gap = await asyncio.wait_for(take(0, 7), 5)
    assert json.loads(with_gap[0]) == {
        "type": "gap", "session_id": sid, "from_seq": 1, "to_seq": 2,
    }  # fmt: skip
    assert [envelope_seq(r) for r in with_gap[1:]] == list(range(3, 9))
    await supervisor.close()
    await hub.close()
    await client.aclose()
