"""Usage reports read from the model proxy's records (``UsageDay``, ``ModelRequest``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db.models import ModelRequest, Session, UsageDay, as_utc
from gateway.schemas import (
    ModelRequestPublic,
    SessionUsage,
    UsageCounters,
    UsageDayPublic,
    UsageReport,
)


async def daily_usage(
    db: AsyncSession, *, user: str, days: int, daily_budget_usd: float | None
) -> UsageReport:
    """``user``'s usage on each of the last ``days`` UTC days that had any (newest first)."""
    since = (datetime.now(UTC) - timedelta(days=days - 1)).strftime("%Y-%m-%d")
    rows = (
        await db.exec(
            select(UsageDay)
            .where(col(UsageDay.owner) == user, col(UsageDay.day) >= since)
            .order_by(col(UsageDay.day).desc())
        )
    ).all()
    out = [
        UsageDayPublic(
            day=r.day,
            requests=r.requests,
            input_tokens=r.input_tokens,
            output_tokens=r.output_tokens,
            cache_creation_input_tokens=r.cache_creation_input_tokens,
            cache_read_input_tokens=r.cache_read_input_tokens,
            cost_usd=r.spend_usd,
        )
        for r in rows
        if r.requests
    ]
    total = UsageCounters()
    for d in out:
        total = _plus(total, d)
    return UsageReport(user=user, days=out, total=total, daily_budget_usd=daily_budget_usd)


async def session_usage(db: AsyncSession, session: Session, *, limit: int) -> SessionUsage:
    """The session's metered requests (oldest ``limit``) and totals over all of them."""
    counts = (
        await db.exec(
            select(
                func.count(),
                func.coalesce(func.sum(ModelRequest.input_tokens), 0),
                func.coalesce(func.sum(ModelRequest.output_tokens), 0),
                func.coalesce(func.sum(ModelRequest.cost_usd), 0.0),
            ).where(col(ModelRequest.session_id) == session.id)
        )
    ).one()
    caches = (
        await db.exec(
            select(
                func.coalesce(func.sum(ModelRequest.cache_creation_input_tokens), 0),
                func.coalesce(func.sum(ModelRequest.cache_read_input_tokens), 0),
            ).where(col(ModelRequest.session_id) == session.id)
        )
    ).one()
    rows = (
        await db.exec(
            select(ModelRequest)
            .where(col(ModelRequest.session_id) == session.id)
            .order_by(col(ModelRequest.started_at))
            .limit(limit)
        )
    ).all()
    return SessionUsage(
        session_id=session.id,
        total=UsageCounters(
            requests=int(counts[0]),
            input_tokens=int(counts[1]),
            output_tokens=int(counts[2]),
            cache_creation_input_tokens=int(caches[0]),
            cache_read_input_tokens=int(caches[1]),
            cost_usd=float(counts[3]),
        ),
        budget_usd=session.budget_usd,
        requests=[
            ModelRequestPublic(
                request_id=r.id,
                turn_id=r.turn_id,
                model=r.model,
                stream=r.stream,
                status_code=r.status_code,
                input_tokens=r.input_tokens,
                output_tokens=r.output_tokens,
                cache_creation_input_tokens=r.cache_creation_input_tokens,
                cache_read_input_tokens=r.cache_read_input_tokens,
                cost_usd=r.cost_usd,
                complete=r.complete,
                error=r.error,
                started_at=as_utc(r.started_at) or r.started_at,
                duration_ms=r.duration_ms,
            )
            for r in rows
        ],
    )


def _plus(a: UsageCounters, b: UsageCounters) -> UsageCounters:
    return UsageCounters(
        requests=a.requests + b.requests,
        input_tokens=a.input_tokens + b.input_tokens,
        output_tokens=a.output_tokens + b.output_tokens,
        cache_creation_input_tokens=a.cache_creation_input_tokens + b.cache_creation_input_tokens,
        cache_read_input_tokens=a.cache_read_input_tokens + b.cache_read_input_tokens,
        cost_usd=a.cost_usd + b.cost_usd,
    )
