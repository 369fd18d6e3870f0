"""Recording metered requests: one transaction per request (metering/budgets.py ``commit``),
retried in the background for 5 min when the database fails, so a response is never failed for
its bookkeeping. Background work is kept in a bounded set and awaited (≤ 10 s) at close."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from gateway.db.models import ModelRequest, utcnow
from gateway.metrics import Metrics
from gateway.services.metering import budgets
from gateway.services.metering.budgets import Grant, Reservation
from gateway.services.metering.prices import PriceTable, Usage

logger = logging.getLogger("gateway.services.model_proxy")

UNKNOWN_MODEL = "unknown"
"""The model of a request whose body was not parsed, until the upstream names it."""
MAX_BACKGROUND = 1000


@dataclass
class MeteredCall:
    """One metered request in flight."""

    grant: Grant
    held: Reservation
    model: str
    path: str
    stream: bool
    started: float
    started_at: datetime = field(default_factory=utcnow)
    id: str = field(default_factory=lambda: str(uuid.uuid4()))


class Recorder:
    """Records metered requests for the model proxy (see the module docstring)."""

    def __init__(
        self,
        db_factory: async_sessionmaker[AsyncSession],
        metrics: Metrics,
        prices: PriceTable,
    ) -> None:
        self._db = db_factory
        self._metrics = metrics
        self.prices = prices
        self._background: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Wait (≤ 10 s) for background work still running."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=10)

    def spawn(self, work: Awaitable[None]) -> None:
        """Run ``work`` in the background (kept until done; at most ``MAX_BACKGROUND`` at once:
        past that it is dropped, logged and counted as lost)."""
        if len(self._background) >= MAX_BACKGROUND:
            self._metrics.proxy_record_failures.labels(outcome="lost").inc()
            logger.error("model proxy: %d background steps pending; dropping one", MAX_BACKGROUND)
            if asyncio.iscoroutine(work):
                work.close()
            return

        async def run() -> None:
            try:
                await work
            except Exception:
                logger.exception("model proxy: background step failed")

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def record(
        self,
        call: MeteredCall,
        usage: Usage,
        *,
        status: int,
        error: str | None = None,
        model: str | None = None,
    ) -> None:
        """Commit the request's cost and release its reservation; on a database failure the
        commit is retried in the background (≤ 5 min) instead of failing the response."""
        if model and call.model == UNKNOWN_MODEL:
            call.model = model
        fields: dict[str, Any] = dict(
            id=call.id,
            session_id=call.grant.session_id,
            root_id=call.grant.root_id,
            owner=call.grant.owner,
            model=call.model,
            path=call.path[:200],
            stream=call.stream,
            status_code=status,
            cost_usd=self.prices.cost(call.model, usage),
            reserved_usd=call.held.amount_usd,
            complete=error is None,
            error=error,
            started_at=call.started_at,
            duration_ms=int((time.monotonic() - call.started) * 1000),
            **usage.as_dict(),
        )
        if model and model != call.model:
            fields["error"] = (error or "") + f" (upstream answered as {model[:100]})"
        try:
            await self._commit(call, fields, usage)
        except (SQLAlchemyError, OSError) as exc:
            self._metrics.proxy_record_failures.labels(outcome="retried").inc()
            logger.warning("model proxy: recording %s failed (%s); retrying", call.id, exc)
            self.spawn(self._commit_retrying(call, fields, usage))
            return
        self._count(fields["cost_usd"], usage)

    async def _commit(self, call: MeteredCall, fields: dict[str, Any], usage: Usage) -> None:
        async with self._db() as db:
            await budgets.commit(db, call.grant, ModelRequest(**fields), usage, call.held)

    async def _commit_retrying(
        self, call: MeteredCall, fields: dict[str, Any], usage: Usage
    ) -> None:
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type((SQLAlchemyError, OSError)),
                stop=stop_after_delay(300),
                wait=wait_exponential(max=10),
                reraise=True,
            ):
                with attempt:
                    await self._commit(call, fields, usage)
        except Exception:
            self._metrics.proxy_record_failures.labels(outcome="lost").inc()
            logger.error(
                "model proxy: request %s of session %s could not be recorded "
                "(cost $%.6f, tokens %s)",
                call.id,
                call.grant.session_id,
                fields["cost_usd"],
                usage.as_dict(),
                exc_info=True,
            )
            return
        self._count(fields["cost_usd"], usage)

    def _count(self, cost_usd: float, usage: Usage) -> None:
        for kind, value in usage.as_dict().items():
            if value:
                self._metrics.tokens.labels(kind=kind).inc(value)
        if cost_usd > 0:
            self._metrics.cost_usd.inc(cost_usd)
