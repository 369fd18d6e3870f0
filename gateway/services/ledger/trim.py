"""Trimming the events streams below what the ledger has persisted.

The wrapper only appends; this is the one place that shortens a session's stream. A pass cuts
below ``min(watermark + 1, newest - keep + 1)``: the watermark is the consumer group's last
delivered id, held below the oldest entry still pending on any replica, so an event that is not
in the database yet is never trimmed, and ``keep`` (``CCGATE_STREAM_MAXLEN``) entries stay for
fast replays. A stream is trimmed at most once per ``every_s`` after acknowledgements, and again
on the ledger's refresh when entries were acknowledged after its last pass (an idle session's
tail), or when the last pass was held back by pending entries.

Failures: the stream or group gone (session deleted) -> forgotten; Redis down -> the error
reaches the ledger's loop, which retries later (trimming late only costs memory).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from gateway.services.session_redis import ledger_group
from wrapper.protocol import LEDGER_GROUP, events_key


class StreamTrimmer:
    """Per-session trim bookkeeping of one ledger (state is per process, the watermark the
    group's)."""

    def __init__(self, client: aioredis.Redis, *, keep: int, every_s: float = 1.0) -> None:
        self._redis = client
        self._keep = keep
        self._every_s = every_s
        self._trimmed_at: dict[str, float] = {}
        self._trimmed_seq: dict[str, int] = {}  # how far the last pass could go, per session
        self._acked: dict[str, int] = {}  # highest seq this process acknowledged, per session

    def forget(self, session_id: str) -> None:
        """Drop a session no longer read."""
        self._trimmed_at.pop(session_id, None)
        self._trimmed_seq.pop(session_id, None)
        self._acked.pop(session_id, None)

    async def acknowledged(self, session_id: str, seqs: Iterable[int]) -> None:
        """Note acknowledged seqs; trim now unless the stream was trimmed under ``every_s``
        ago."""
        self._acked[session_id] = max(self._acked.get(session_id, 0), *seqs)
        if time.monotonic() - self._trimmed_at.get(session_id, 0.0) >= self._every_s:
            await self._trim(session_id, self._acked[session_id])

    async def trim_idle(self, tracked: Iterable[str]) -> None:
        """Trim streams acknowledged past their last pass (the ledger's refresh calls this)."""
        live = set(tracked)
        for sid, acked in list(self._acked.items()):
            if sid not in live:
                self.forget(sid)
            elif self._trimmed_seq.get(sid, 0) < acked:
                await self._trim(sid, acked)

    async def _trim(self, sid: str, acked_seq: int) -> None:
        stream = events_key(sid)
        try:
            group = ledger_group(await self._redis.xinfo_groups(stream))
            summary = await self._redis.xpending(stream, LEDGER_GROUP)
            newest = await self._redis.xrevrange(stream, count=1)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc) and "no such key" not in str(exc).lower():
                raise
            self.forget(sid)  # the stream is gone (session deleted)
            return
        if group is None or not newest:
            return
        last = seq_of_id(newest[0][0])
        watermark = seq_of_id(group.get("last-delivered-id") or "0-0")
        if summary and int(summary.get("pending") or 0) > 0 and summary.get("min"):
            watermark = min(watermark, seq_of_id(summary["min"]) - 1)
        threshold = min(watermark + 1, last - self._keep + 1)
        self._trimmed_at[sid] = time.monotonic()
        # Held back by entries not yet persisted: the next idle pass tries again.
        held = watermark < last - self._keep
        self._trimmed_seq[sid] = watermark if held else max(acked_seq, last)
        if threshold > 1:
            await self._redis.xtrim(stream, minid=f"{threshold}-0", approximate=self._keep >= 1000)


def seq_of_id(entry_id: Any) -> int:
    """The seq of a stream entry id ``<seq>-0`` (bytes or str)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text.split("-")[0])
