"""Helpers for reading a session's WebSocket stream in tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection

Predicate = Callable[[dict[str, Any]], bool]


def turn_done(message_id: str) -> Predicate:
    """True on the turn_completed event of ``message_id``."""
    return lambda e: e.get("type") == "turn_completed" and e.get("turn_id") == message_id


async def collect_until(
    ws: ClientConnection, stop: Predicate, *, timeout_s: float = 90.0
) -> list[dict[str, Any]]:
    """Event envelopes (messages with a seq) up to and including the first matching ``stop``."""
    events: list[dict[str, Any]] = []

    async def _read() -> None:
        while True:
            message = json.loads(await ws.recv())
            if "seq" not in message:
                continue
            events.append(message)
            if stop(message):
                return

    await asyncio.wait_for(_read(), timeout_s)
    return events
