"""The session runner: one long-lived CLI, turns from Redis, every stdout line out as an event.

Life of a container:
    launch CLI (``--session-id``) -> ``initialize`` handshake -> ``ready``
    loop: BLPOP a TurnRequest -> ``turn_started`` -> user line on stdin -> CLI lines ...
          -> ``result`` -> workspace diff -> ``turn_completed``
    CLI dies -> the running turn completes as failed -> relaunch with ``--resume`` ->
          ``cli_restarted`` (more than ``max_restarts`` deaths in ``restart_window_s`` -> ``error``)
    SIGTERM -> close stdin, wait, SIGTERM, SIGKILL the CLI -> ``exited``

Assembled from its parts; see SessionRunner."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from wrapper.control import ControlLoops
from wrapper.protocol import (
    EventType,
    SessionSpec,
)
from wrapper.publisher import EventPublisher
from wrapper.runner_state import PendingEvents, StartupFailed
from wrapper.sdk_mcp import SdkMcpHost

logger = logging.getLogger("wrapper.runner")

__all__ = ["PendingEvents", "SessionRunner", "StartupFailed"]


class SessionRunner(ControlLoops):
    """Drives the CLI for one session; ``run()`` returns the wrapper's exit status.

    Its parts: runner_state.py (shared state, events), cli_life.py (the CLI process),
    turns.py (the turn loop), control.py (control list and token).
    """

    # ----------------------------------------------------------------------------- main

    def bind(self, spec: SessionSpec, *, publisher: EventPublisher, claimed_at: float) -> None:
        """Warm pool: make this prestarted runner serve its claimed session. Events kept
        since the launch are replayed on the session's publisher first; ``ready`` follows
        from ``run()`` with ``pooled: true`` and ``claim_ms``."""
        pending = self._events
        self._spec = spec
        self._mcp = SdkMcpHost(self._gateway_tools())
        self._events = publisher
        self._claimed_at = claimed_at
        if isinstance(pending, PendingEvents):
            pending.replay_into(publisher)

    async def run(self) -> int:
        """Run until stopped; emits ``exited`` last and returns the process exit status."""
        await asyncio.to_thread(self._workspace.baseline)
        tasks = [
            asyncio.create_task(self._supervise(), name="supervise"),
            asyncio.create_task(self._turn_loop(), name="turns"),
            asyncio.create_task(self._control_loop(), name="control"),
        ]
        if self._spec.gateway_url:
            tasks.append(asyncio.create_task(self._token_loop(), name="token"))
        await self._until_stop_or_failure(tasks)
        reason = "crashed" if self._exit_status else "stopped"
        exit_code: int | None = None
        if self._cli is not None:
            if self._turn is not None and self._cli.returncode is None:
                # Interrupt the running turn first so the CLI ends it cleanly and quickly.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._interrupt(), 2)
                if self._result is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(self._result), 2)
            exit_code = await self._cli.stop(self._config.stop_grace_s)
        self._complete_turn_synthetic("the session was stopped", terminal_reason="stopped")
        if self._turn is not None:
            # Let the running turn publish its turn_completed before the loops are cancelled.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._turn_idle.wait(), 10)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._emit(EventType.EXITED, {"reason": reason, "cli_exit_code": exit_code})
        await self._events.close(timeout_s=10)
        return self._exit_status

    async def _until_stop_or_failure(self, tasks: list[asyncio.Task[None]]) -> None:
        """Wait for a stop request; a loop that dies first ends the session visibly (an
        ``error`` event naming it, then ``exited crashed``) instead of leaving a container
        that neither publishes nor exits."""
        stop = asyncio.create_task(self._stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        for task in done:
            if task is stop or self._stop.is_set():
                continue
            failure = None if task.cancelled() else task.exception()
            logger.error("wrapper task %s ended: %r", task.get_name(), failure)
            self._fatal(
                "wrapper_task_failed",
                f"wrapper task {task.get_name()} ended unexpectedly: {failure!r}",
                list(self._cli.stderr_tail) if self._cli else [],
            )
