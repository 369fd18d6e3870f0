"""A full config volume (a real, tiny tmpfs): the session fails visibly, with a reason.

The wrapper journals every event in its outbox on the session's config volume before sending
it. When that filesystem is full, the event is still published from memory, the wrapper
publishes ``error {code: outbox_failed}`` naming the cause and ends the session; nothing hangs.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.containers import RedisContainer
from wrapper.config import WrapperConfig
from wrapper.outbox import Outbox
from wrapper.protocol import EventType, SessionSpec, events_key
from wrapper.publisher import EventPublisher
from wrapper.runner import SessionRunner


@pytest.fixture
def tiny_volume(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (this suite runs as root, like scripts/setup.sh)."""
    target = tmp_path / "cfg"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(target)], check=True)
    yield target
    subprocess.run(["umount", str(target)], check=True)


async def test_a_full_config_volume_ends_the_session_with_a_reason(
    tiny_volume: Path, redis_server: RedisContainer
) -> None:
    sid = str(uuid.uuid4())
    client = aioredis.Redis.from_url(redis_server.url)
    state_dir = str(tiny_volume / "ccgate")
    outbox = Outbox(state_dir, compact_bytes=1 << 30)
    publisher = EventPublisher(client, sid, outbox=outbox)
    await publisher.start()
    config = WrapperConfig(session_id=sid, redis_url=redis_server.url, state_dir=state_dir)
    runner = SessionRunner(
        config,
        SessionSpec(session_id=sid, model="m"),
        publisher=publisher,
        input_redis=client,
        control_redis=client,
        state_redis=client,
    )
    blob = "x" * 4096
    for n in range(40):  # 40 events of 4 KiB: more than the volume holds
        runner._emit(EventType.CLI_RESTARTED, {"n": n, "pad": blob})
        if runner._stop.is_set():
            break
    assert runner._stop.is_set(), "the wrapper must end the session"
    assert await publisher.flush(5)
    entries = await client.xrange(events_key(sid))
    envelopes = [json.loads(fields[b"e"]) for _, fields in entries]
    assert [e["seq"] for e in envelopes] == list(range(1, len(envelopes) + 1))  # nothing lost
    errors = [e for e in envelopes if e["type"] == "error"]
    assert len(errors) == 1 and errors[0]["data"]["code"] == "outbox_failed"
    assert "No space left on device" in errors[0]["data"]["message"]
    assert os.statvfs(tiny_volume).f_bfree == 0
    await publisher.close(1)
    outbox.close()
    await client.aclose()
