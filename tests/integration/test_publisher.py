"""The wrapper's publisher against a real Redis: seq, stream ids, pub/sub, outages."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import redis.asyncio as aioredis

from tests.containers import RedisContainer
from tests.servers import RedisServer
from wrapper.outbox import Outbox
from wrapper.protocol import EventSource, events_key, live_channel
from wrapper.publisher import EventPublisher


async def test_events_get_consecutive_seqs_stream_ids_and_live_copies(
    redis_server: RedisContainer,
) -> None:
    sid = str(uuid.uuid4())
    client = aioredis.Redis.from_url(redis_server.url)
    pubsub = client.pubsub()
    await pubsub.subscribe(live_channel(sid))
    publisher = EventPublisher(client, sid)
    await publisher.start()
    for n in range(50):
        publisher.emit("assistant", json.dumps({"n": n}), source=EventSource.CLI, turn_id="t")
    assert await publisher.flush(5)
    entries = await client.xrange(events_key(sid))
    assert [e[0] for e in entries] == [f"{n}-0".encode() for n in range(1, 51)]
    live = []
    while len(live) < 50:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
        if message:
            live.append(json.loads(message["data"])["seq"])
    assert live == list(range(1, 51))
    await publisher.close(1)

    # A new publisher (restarted wrapper) continues after the last seq.
    again = EventPublisher(client, sid)
    await again.start()
    assert again.emit("ready", "{}", source=EventSource.WRAPPER, turn_id=None) == 51
    await again.close(5)
    await pubsub.aclose()
    await client.aclose()


async def test_events_survive_a_redis_outage_in_order_without_duplicates() -> None:
    server = RedisServer().start()
    sid = str(uuid.uuid4())
    client = aioredis.Redis.from_url(server.url, socket_connect_timeout=1)
    publisher = EventPublisher(client, sid)
    await publisher.start()
    publisher.emit("a", "{}", source=EventSource.CLI, turn_id=None)
    assert await publisher.flush(5)
    server.stop()
    for n in range(20):  # the CLI keeps talking while Redis is down
        publisher.emit("b", json.dumps({"n": n}), source=EventSource.CLI, turn_id=None)
    assert not await publisher.flush(1)
    server.proc = None
    restarted = RedisServer(port=server.port, password=server.password).start()
    try:
        # Redis came back empty (no persistence): the seqs after the outage still arrive in order.
        assert await publisher.flush(15)
        entries = await client.xrange(events_key(sid))
        assert [int(e[0].split(b"-")[0]) for e in entries] == list(range(2, 22))
    finally:
        await publisher.close(1)
        await client.aclose()
        restarted.stop()


async def test_a_resent_event_is_not_appended_or_published_twice(
    redis_server: RedisContainer,
) -> None:
    sid = str(uuid.uuid4())
    client = aioredis.Redis.from_url(redis_server.url)
    publisher = EventPublisher(client, sid)
    await publisher.start()
    publisher.emit("a", "{}", source=EventSource.CLI, turn_id=None)
    assert await publisher.flush(5)
    await publisher._send([(1, '{"seq":1,"dup":true}')])  # a retry after a lost reply
    entries = await client.xrange(events_key(sid))
    assert len(entries) == 1 and b"dup" not in entries[0][1][b"e"]
    await publisher.close(1)
    await client.aclose()
    await asyncio.sleep(0)


async def test_a_wrapper_restarted_during_an_outage_delivers_its_journal(
    tmp_path: Path,
) -> None:
    server = RedisServer().start()
    sid = str(uuid.uuid4())
    client = aioredis.Redis.from_url(server.url, socket_connect_timeout=1)
    first = EventPublisher(client, sid, outbox=Outbox(str(tmp_path)))
    await first.start()
    first.emit("a", "{}", source=EventSource.CLI, turn_id=None)
    assert await first.flush(5)
    server.stop()
    for n in range(10):
        first.emit("b", json.dumps({"n": n}), source=EventSource.CLI, turn_id=None)
    await first.close(0.5)  # the wrapper dies with 10 events undelivered
    server.proc = None
    restarted = RedisServer(port=server.port, password=server.password).start()
    try:
        second = EventPublisher(client, sid, outbox=Outbox(str(tmp_path)))
        await second.start()
        assert second.emit("c", "{}", source=EventSource.CLI, turn_id=None) == 12
        assert await second.flush(10)
        entries = await client.xrange(events_key(sid))
        assert [int(e[0].split(b"-")[0]) for e in entries] == list(range(2, 13))
        await second.close(1)
    finally:
        await client.aclose()
        restarted.stop()


async def test_the_wrapper_never_trims_the_stream(redis_server: RedisContainer) -> None:
    """Trimming is the ledger's, below what it persisted; the wrapper appends only."""
    sid = str(uuid.uuid4())
    client = aioredis.Redis.from_url(redis_server.url)
    publisher = EventPublisher(client, sid)
    await publisher.start()
    for _ in range(30):
        publisher.emit("x", "{}", source=EventSource.CLI, turn_id=None)
    assert await publisher.flush(5)
    entries = await client.xrange(events_key(sid))
    assert [int(e[0].split(b"-")[0]) for e in entries] == list(range(1, 31))
    await publisher.close(1)
    await client.aclose()


async def test_redis_out_of_memory_holds_events_until_it_recovers(
    redis_server: RedisContainer, tmp_path: Path
) -> None:
    """maxmemory reached mid-turn: XADD is refused (OOM); the publisher keeps every event,
    only a bounded number in memory (the rest in the outbox), and delivers all, in order,
    once memory is available again."""
    sid = str(uuid.uuid4())
    client = aioredis.Redis.from_url(redis_server.url)
    admin = aioredis.Redis.from_url(redis_server.url)
    publisher = EventPublisher(client, sid, outbox=Outbox(str(tmp_path)), max_pending=50)
    await publisher.start()
    publisher.emit("x", "{}", source=EventSource.CLI, turn_id=None)
    assert await publisher.flush(5)
    await admin.config_set("maxmemory-policy", "noeviction")
    await admin.config_set("maxmemory", "1")
    try:
        for n in range(500):
            publisher.emit("x", f'{{"n":{n}}}', source=EventSource.CLI, turn_id=None)
        assert not await publisher.flush(1.0)  # refused while Redis is full
        assert len(publisher._pending) <= 50  # bounded memory; the rest waits in the outbox
        assert await client.xlen(events_key(sid)) == 1
    finally:
        await admin.config_set("maxmemory", "0")
    assert await publisher.flush(15)
    entries = await client.xrange(events_key(sid))
    assert [int(e[0].split(b"-")[0]) for e in entries] == list(range(1, 502))
    assert json.loads(entries[-1][1][b"e"])["data"] == {"n": 499}
    await publisher.close(1)
    await client.aclose()
    await admin.aclose()
