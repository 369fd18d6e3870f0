"""Usage read off upstream Messages API responses as they pass through the proxy.

A stream (text/event-stream, event shapes from platform.claude.com/docs/build-with-claude/
streaming) reports usage twice: ``message_start.message.usage`` (input and cache counts, an
initial output count) and ``message_delta.usage`` (cumulative output, and on newer API versions
the input counts again). A JSON Message carries ``usage`` once. :class:`StreamMeter` is fed the
raw bytes exactly as they are forwarded; it never changes or holds them, and it bounds what it
buffers (one event of at most ``max_event_bytes``; longer events are skipped, not parsed).
"""

from __future__ import annotations

import json
from typing import Any

from gateway.services.metering.prices import Usage


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_of(raw: Any) -> dict[str, int]:
    """The counters present in one ``usage`` object (absent or malformed ones left out)."""
    if not isinstance(raw, dict):
        return {}
    out = {
        k: _count(raw[k])
        for k in (
            "input_tokens",
            "output_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
        )
        if k in raw
    }
    creation = raw.get("cache_creation")
    if isinstance(creation, dict) and "ephemeral_1h_input_tokens" in creation:
        out["cache_creation_1h_tokens"] = _count(creation["ephemeral_1h_input_tokens"])
    return out


class StreamMeter:
    """Incremental SSE reader that keeps the latest usage counters of one response."""

    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        self._buffer = bytearray()
        self._max = max_event_bytes
        self._skipping = False
        self._counters: dict[str, int] = {}
        self.model: str | None = None
        self.finished = False
        """True once ``message_delta`` (the final usage) was seen."""
        self.stopped = False
        """True once ``message_stop`` (the last event) was seen."""
        self.streamed_bytes = 0
        """Bytes of the response so far (to estimate output when the stream is cut)."""

    def feed(self, chunk: bytes) -> None:
        """Read one forwarded chunk."""
        self.streamed_bytes += len(chunk)
        self._buffer += chunk
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                if len(self._buffer) > self._max:
                    self._buffer.clear()
                    self._skipping = True
                return
            event = bytes(self._buffer[:end])
            del self._buffer[: end + 2]
            if self._skipping:
                self._skipping = False
                continue
            self._event(event)

    def _event(self, event: bytes) -> None:
        if b"message_" not in event:
            return
        for line in event.replace(b"\r\n", b"\n").split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            try:
                data = json.loads(line[5:])
            except ValueError:
                return
            if not isinstance(data, dict):
                return
            kind = data.get("type")
            if kind == "message_start":
                message = data.get("message")
                if isinstance(message, dict):
                    if isinstance(message.get("model"), str):
                        self.model = message["model"][:200]
                    self._counters.update(usage_of(message.get("usage")))
            elif kind == "message_delta":
                self._counters.update(usage_of(data.get("usage")))
                self.finished = True
            elif kind == "message_stop":
                self.stopped = True

    def usage(self) -> Usage:
        """The counters so far; when the final usage never came, output is estimated from
        the bytes streamed (4 per token, at least the count already reported)."""
        c = dict(self._counters)
        if not self.finished:
            c["output_tokens"] = max(c.get("output_tokens", 0), self.streamed_bytes // 4)
        return Usage(**c)


def message_usage(body: bytes) -> tuple[Usage, str | None]:
    """Usage and model of a JSON Message body (zeros when it has none)."""
    try:
        data = json.loads(body)
    except ValueError:
        return Usage(), None
    if not isinstance(data, dict):
        return Usage(), None
    model = data.get("model")
    return Usage(**usage_of(data.get("usage"))), model[:200] if isinstance(model, str) else None
