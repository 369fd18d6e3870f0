"""Dedicated thread pools for blocking SDK calls (docker, S3, files), one per dependency.

The docker SDK, the minio SDK and file I/O block; they run here rather than on the loop or in
asyncio's shared default executor, so six slow ``docker stop`` calls cannot starve S3 uploads or
the health checks. Each pool counts the calls waiting for a thread (``queued``) and running
(``running``) for /metrics.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class BlockingPool:
    """A named ThreadPoolExecutor with queue-depth accounting.

    ``await pool.run(fn)`` runs ``fn()`` in a thread of this pool (context variables such as
    the request id are carried over) and returns its result or raises its exception.
    """

    def __init__(self, name: str, max_workers: int) -> None:
        if max_workers < 1:
            raise ValueError(f"{name} pool needs at least one thread")
        self.name = name
        self.max_workers = max_workers
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix=f"ccgate-{name}")
        self._lock = threading.Lock()
        self.submitted = 0
        self.running = 0
        self.completed = 0

    @property
    def queued(self) -> int:
        """Calls waiting for a free thread."""
        return self.submitted - self.running - self.completed

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the pool; cancellation abandons the wait, not the running call."""
        ctx = contextvars.copy_context()

        def call() -> T:
            with self._lock:
                self.running += 1
            try:
                return ctx.run(fn)
            finally:
                with self._lock:
                    self.running -= 1
                    self.completed += 1

        self.submitted += 1
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(call))

    def shutdown(self) -> None:
        """Stop accepting work; running calls finish in their threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)
