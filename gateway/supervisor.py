"""Supervision of the gateway's long-running tasks (event hub, ledger, collector, reaper).

Every background loop runs under :class:`Supervisor`: when it raises, the failure is logged
with its traceback and counted, and the loop is restarted after an exponential backoff
(``backoff_s`` doubling up to ``max_backoff_s``). While a task is down (between its crash and its
restart) ``/health/ready`` is red and names it. Nothing dies silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class TaskState:
    """What /health/ready and /metrics know of one supervised task."""

    name: str
    running: bool = False
    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None


@dataclass
class Supervisor:
    """Runs named coroutine loops forever, restarting them after failures."""

    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    on_failure: Callable[[str], None] | None = None
    """Called with the task name after each failure (metrics)."""
    states: dict[str, TaskState] = field(default_factory=dict)
    _tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def start(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run ``loop()`` under supervision; a return is treated like a failure (loops are
        meant to run until cancelled)."""
        if name in self._tasks:
            raise ValueError(f"task {name} is already supervised")
        state = self.states[name] = TaskState(name)
        self._tasks[name] = asyncio.create_task(self._guard(state, loop), name=name)

    async def _guard(self, state: TaskState, loop: Callable[[], Awaitable[None]]) -> None:
        backoff = self.backoff_s
        while True:
            state.running = True
            started = time.monotonic()
            try:
                await loop()
                raise RuntimeError("the loop returned")
            except asyncio.CancelledError:
                state.running = False
                raise
            except Exception as exc:
                state.running = False
                state.restarts += 1
                state.last_error = f"{type(exc).__name__}: {exc}"[:500]
                state.last_error_at = time.time()
                logger.exception("task %s failed; restarting in %.1fs", state.name, backoff)
                if self.on_failure is not None:
                    self.on_failure(state.name)
            if time.monotonic() - started > 60:
                backoff = self.backoff_s  # it ran well for a while: start the backoff over
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    def down(self) -> list[str]:
        """Names of tasks that are not running now."""
        return [s.name for s in self.states.values() if not s.running]

    async def close(self, timeout_s: float = 10.0) -> None:
        """Cancel every task and wait for them, at most ``timeout_s`` in all: a task that does
        not end is logged by name and left behind, so shutdown never hangs."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                logger.error("task %s did not stop within %.0fs", task.get_name(), timeout_s)
            for task in done:
                with contextlib.suppress(asyncio.CancelledError):
                    task.result()
        self._tasks.clear()
