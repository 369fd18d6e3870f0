"""The control list (interrupt, notify) and the session token copied for the ccgate MCP tools."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import cast

from redis.exceptions import RedisError

from wrapper.protocol import (
    ControlMessage,
    ControlType,
    EventSource,
    EventType,
    control_key,
    token_key,
)
from wrapper.turns import _BLPOP_TIMEOUT_S, TurnLoop

logger = logging.getLogger("wrapper.runner")


class ControlLoops(TurnLoop):
    """Interrupts and notices from the gateway; the session token kept fresh for the MCP tools."""

    async def _control_loop(self) -> None:
        key = control_key(self._spec.session_id)
        while not self._stop.is_set():
            try:
                item = await self._control_redis.blpop([key], timeout=_BLPOP_TIMEOUT_S)
            except (RedisError, OSError) as exc:
                logger.warning("control: redis unreachable: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if item is None:
                continue
            try:
                message = ControlMessage.from_json(item[1])
            except (ValueError, KeyError) as exc:
                self._emit(EventType.ERROR, {"code": "bad_control_message", "message": str(exc)})
                continue
            if message.type is ControlType.INTERRUPT:
                if self._turn is not None:
                    # The turn loop kills the CLI if no result follows within the grace.
                    self._interrupt_requested.set()
                await self._interrupt()
            elif message.type is ControlType.NOTIFY and message.event:
                self._events.emit(
                    message.event,
                    json.dumps(message.data or {}),
                    source=EventSource.GATEWAY,
                    turn_id=self._turn.message_id if self._turn else None,
                )

    async def _token_loop(self) -> None:
        """Keep the gateway-renewed session token (Redis) in memory for the ccgate tools."""
        key = token_key(self._spec.session_id)
        current: bytes | None = None
        while True:
            try:
                token = cast(bytes | None, await self._state_redis.get(key))
            except (RedisError, OSError) as exc:
                logger.warning("token: redis unreachable: %s", exc)
                token = None
            if token and token != current:
                self._gateway_token = token.decode(errors="replace")
                current = token
            await asyncio.sleep(1.0 if current is None else 20.0)
