"""The runner's shared state and its event helpers (the parts: cli_life, turns, control, runner)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import deque
from typing import Any

import redis.asyncio as aioredis

from wrapper.cli_process import (
    CliProcess,
)
from wrapper.config import WrapperConfig
from wrapper.launch import MARKER_FILE, EarlyLaunch
from wrapper.mcp_tools import GatewayTools
from wrapper.protocol import (
    EventSource,
    EventType,
    SessionSpec,
    TurnOutcome,
    TurnRequest,
)
from wrapper.publisher import EventPublisher
from wrapper.sdk_mcp import SdkMcpHost
from wrapper.workspace import WorkspaceTracker

logger = logging.getLogger("wrapper.runner")


class StartupFailed(Exception):
    """The CLI exited or stayed silent before answering the ``initialize`` handshake."""


class PendingEvents:
    """Events emitted before a warm-pool container has a session (the CLI's answers to the
    handshake), kept in order — at most ``limit``, the rest counted as dropped — and replayed
    into the session's publisher at the claim, so a claimed session's stream starts as a cold
    one's does."""

    def __init__(self, limit: int = 1000) -> None:
        self._items: list[tuple[str, str, EventSource, str | None]] = []
        self._limit = limit
        self.dropped = 0
        self.journal_error: str | None = None
        self.last_seq = 0

    def emit(
        self, event_type: str, data_json: str, *, source: EventSource, turn_id: str | None
    ) -> int:
        """Keep one event; returns its provisional position (not a session seq)."""
        if len(self._items) < self._limit:
            self._items.append((event_type, data_json, source, turn_id))
        else:
            self.dropped += 1
        self.last_seq += 1
        return self.last_seq

    def replay_into(self, publisher: EventPublisher) -> None:
        """Emit everything kept, in order, on the session's publisher."""
        for event_type, data_json, source, turn_id in self._items:
            publisher.emit(event_type, data_json, source=source, turn_id=turn_id)
        self._items.clear()

    async def close(self, timeout_s: float) -> None:
        """Nothing to deliver: a container that was never claimed has no session."""


class RunnerState:
    """What every part of the runner shares: config, spec, clients, the CLI and the turn."""

    def __init__(
        self,
        config: WrapperConfig,
        spec: SessionSpec,
        *,
        publisher: EventPublisher | PendingEvents,
        input_redis: aioredis.Redis,
        control_redis: aioredis.Redis,
        state_redis: aioredis.Redis,
        early: EarlyLaunch | None = None,
    ) -> None:
        self._config = config
        self._spec = spec
        self._events: EventPublisher | PendingEvents = publisher
        self._input_redis = input_redis
        self._control_redis = control_redis
        self._state_redis = state_redis
        self._gateway_token: str | None = None
        """The session's JWT for the ccgate tools (renewed from Redis; never on disk)."""
        self._mcp = SdkMcpHost(self._gateway_tools())
        self._workspace = WorkspaceTracker(config.workspace)
        self._cli: CliProcess | None = None
        self._pump: asyncio.Task[int] | None = None
        self._ready = asyncio.Event()
        self._turn_idle = asyncio.Event()
        self._stop = asyncio.Event()
        self._turn: TurnRequest | None = None
        self._result: asyncio.Future[dict[str, Any]] | None = None
        self._control_waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._interrupt_requested = asyncio.Event()
        """Set by the control loop when a client interrupts the running turn."""
        self._interrupt_cause: TurnOutcome | None = None
        self._crashes: deque[float] = deque()
        self._exit_status = 0
        self._state_file = os.path.join(config.marker_dir, MARKER_FILE)
        self._prestarted: dict[str, Any] | None = None
        """The CLI a warm-pool container launched before its claim (its ``ready`` info)."""
        self._claimed_at: float | None = None
        self._early = early
        """The CLI ``launch_early`` started before the wrapper's imports, adopted at launch."""

    def _gateway_tools(self) -> GatewayTools:
        """The ccgate tools of the current spec, calling with the current token."""
        return GatewayTools(
            self._spec.gateway_url or "",
            token=lambda: self._gateway_token,
            session_id=lambda: self._spec.session_id,
        )

    def request_stop(self) -> None:
        """Begin a graceful stop (SIGTERM handler)."""
        self._stop.set()

    # ----------------------------------------------------------------------------- events

    def _emit(self, event_type: EventType, data: dict[str, Any]) -> int:
        seq = self._events.emit(
            event_type.value,
            json.dumps(data),
            source=EventSource.WRAPPER,
            turn_id=self._turn.message_id if self._turn else None,
        )
        self._check_journal()
        return seq

    def _check_journal(self) -> None:
        """End the session when the outbox can no longer journal (e.g. its volume is full)."""
        problem = self._events.journal_error
        if problem is not None and not self._stop.is_set():
            self._events.journal_error = None
            self._fatal("outbox_failed", f"cannot journal events: {problem}", [])

    def _fatal(self, code: str, message: str, stderr_tail: list[str]) -> None:
        self._emit(
            EventType.ERROR, {"code": code, "message": message, "stderr_tail": stderr_tail[-10:]}
        )
        self._exit_status = 1
        self._stop.set()

    def _complete_turn_synthetic(self, message: str, *, terminal_reason: str) -> None:
        if self._result is not None and not self._result.done():
            self._result.set_result(synthetic_result(message, terminal_reason))


def synthetic_result(message: str, terminal_reason: str) -> dict[str, Any]:
    """A result for a turn the CLI could not finish itself (shape of a CLI error result)."""
    return {
        "type": "result",
        "subtype": "error_during_execution",
        "is_error": True,
        "result": None,
        "errors": [message],
        "terminal_reason": terminal_reason,
    }
