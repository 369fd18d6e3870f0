"""Turns: BLPOP a TurnRequest -> ``turn_started`` -> the user line on stdin -> the CLI's lines ->
``result`` -> workspace diff -> ``turn_completed`` with its ``outcome``.

A turn that must end early (its deadline passed, or a client interrupted it) gets the CLI's
control-protocol interrupt; if no result follows within ``spec.interrupt_grace_s``, the turn is
ended by the wrapper and the CLI killed (SIGTERM, 1 s, SIGKILL; the supervisor restarts it with
``--resume``). Every turn therefore ends with ``turn_completed``: ``interrupted``, ``timeout``
or ``killed`` when it was cut short."""

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
    TurnOutcome,
    TurnRequest,
    input_key,
)
from wrapper.runner_state import synthetic_result

logger = logging.getLogger("wrapper.runner")

_BLPOP_TIMEOUT_S = 2


def turn_outcome(result: dict[str, Any], cause: TurnOutcome | None) -> TurnOutcome:
    """The ``outcome`` of a turn from its result (the CLI's, or the wrapper's synthetic one)
    and what interrupted it, if anything (``cause``: INTERRUPTED or TIMEOUT)."""
    reason = str(result.get("terminal_reason") or "")
    if reason == "turn_timeout":
        return TurnOutcome.TIMEOUT
    if reason in ("interrupt_ignored", "stopped"):
        return TurnOutcome.KILLED
    if reason == "cli_exited":
        return TurnOutcome.EXITED
    if reason.startswith("aborted"):
        return cause or TurnOutcome.INTERRUPTED
    return TurnOutcome.ERROR if result.get("is_error") else TurnOutcome.COMPLETED


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
        self._interrupt_requested.clear()
        self._interrupt_cause = None
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
                "structured_output": result.get("structured_output"),
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
                "outcome": turn_outcome(result, self._interrupt_cause).value,
            },
        )
        self._turn = None
        self._result = None
        self._turn_idle.set()

    async def _await_result(self, request: TurnRequest) -> dict[str, Any]:
        """The turn's result; past its deadline or on a client's interrupt, the CLI gets an
        interrupt and ``interrupt_grace_s`` to answer before it is killed."""
        result = self._result
        assert result is not None
        timeout_s = request.timeout_seconds or self._spec.timeout_seconds
        interrupted: asyncio.Future[Any] = asyncio.ensure_future(self._interrupt_requested.wait())
        waiting: set[asyncio.Future[Any]] = {result, interrupted}
        try:
            await asyncio.wait(waiting, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            interrupted.cancel()
        if result.done():
            return result.result()
        if self._interrupt_requested.is_set():
            self._interrupt_cause = TurnOutcome.INTERRUPTED  # the control loop sent it
        else:
            self._interrupt_cause = TurnOutcome.TIMEOUT
            self._emit(
                EventType.ERROR,
                {"code": "turn_timeout", "message": f"turn exceeded {timeout_s:g}s; interrupting"},
            )
            await self._interrupt()
        grace = self._spec.interrupt_grace_s
        try:
            return await asyncio.wait_for(asyncio.shield(result), grace)
        except TimeoutError:
            pass
        # The CLI ignored the interrupt: end the turn, then kill the CLI (the supervisor
        # restarts it with --resume).
        self._emit(
            EventType.ERROR,
            {
                "code": "interrupt_ignored",
                "message": f"the CLI did not end the turn {grace:g}s after the interrupt; killed",
            },
        )
        timed_out = self._interrupt_cause is TurnOutcome.TIMEOUT
        self._complete_turn_synthetic(
            f"the CLI did not end the turn {grace:g}s after the interrupt and was killed",
            terminal_reason="turn_timeout" if timed_out else "interrupt_ignored",
        )
        if self._cli is not None:
            await self._cli.stop(1.0)
        return result.result()
