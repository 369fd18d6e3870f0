"""Turns: BLPOP a TurnRequest -> ``turn_started`` -> the user line on stdin -> the CLI's lines ->
``result`` (or a timeout: interrupt, then kill) -> workspace diff -> ``turn_completed``."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.exceptions import RedisError

from wrapper.cli_life import CliLife
from wrapper.cli_process import (
    user_message_line,
)
from wrapper.protocol import (
    EventType,
    TurnRequest,
    input_key,
)
from wrapper.runner_state import synthetic_result

logger = logging.getLogger("wrapper.runner")

_INTERRUPT_GRACE_S = 15.0
_BLPOP_TIMEOUT_S = 2


class TurnLoop(CliLife):
    """One turn at a time, from the session's input list."""

    async def _turn_loop(self) -> None:
        key = input_key(self._spec.session_id)
        while not self._stop.is_set():
            await self._ready.wait()
            try:
                item = await self._input_redis.blpop([key], timeout=_BLPOP_TIMEOUT_S)
            except (RedisError, OSError) as exc:
                logger.warning("input: redis unreachable: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if item is None:
                continue
            try:
                request = TurnRequest.from_json(item[1])
            except (ValueError, KeyError) as exc:
                self._emit(EventType.ERROR, {"code": "bad_turn_request", "message": str(exc)})
                continue
            await self._run_turn(request)

    async def _run_turn(self, request: TurnRequest) -> None:
        loop = asyncio.get_running_loop()
        self._turn = request
        self._turn_idle.clear()
        self._result = loop.create_future()
        started = time.monotonic()
        self._emit(EventType.TURN_STARTED, {"message_id": request.message_id})
        try:
            assert self._cli is not None
            await self._cli.write(user_message_line(request.prompt))
            self._mark_transcript()
            result = await self._await_result(request)
        except ConnectionError as exc:
            result = synthetic_result(f"could not write to the CLI: {exc}", "cli_exited")
        files, deleted = await asyncio.to_thread(self._workspace.changes)
        self._emit(
            EventType.TURN_COMPLETED,
            {
                "message_id": request.message_id,
                "subtype": result.get("subtype"),
                "is_error": bool(result.get("is_error")),
                "result": result.get("result"),
                "errors": result.get("errors"),
                "terminal_reason": result.get("terminal_reason"),
                "usage": result.get("usage"),
                "total_cost_usd": result.get("total_cost_usd"),
                "num_turns": result.get("num_turns"),
                "duration_ms": result.get("duration_ms", int((time.monotonic() - started) * 1000)),
                "cli_session_id": result.get("session_id", self._spec.session_id),
                "files": [f.as_dict() for f in files],
                "deleted_files": deleted,
                "workspace_truncated": self._workspace.truncated,
            },
        )
        self._turn = None
        self._result = None
        self._turn_idle.set()

    async def _await_result(self, request: TurnRequest) -> dict[str, Any]:
        assert self._result is not None
        timeout_s = request.timeout_seconds or self._spec.timeout_seconds
        try:
            return await asyncio.wait_for(asyncio.shield(self._result), timeout_s)
        except TimeoutError:
            pass
        self._emit(
            EventType.ERROR,
            {"code": "turn_timeout", "message": f"turn exceeded {timeout_s:g}s; interrupting"},
        )
        await self._interrupt()
        try:
            return await asyncio.wait_for(asyncio.shield(self._result), _INTERRUPT_GRACE_S)
        except TimeoutError:
            # The CLI ignored the interrupt: kill it; the supervisor restarts it with --resume.
            if self._cli is not None:
                await self._cli.stop(1.0)
            return await self._result
