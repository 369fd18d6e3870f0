"""Gauges read at scrape time from the running app (registered once by the lifespan)."""

from __future__ import annotations

from fastapi import FastAPI
from sqlalchemy import func
from sqlmodel import select

from gateway.db.engine import pool_in_use
from gateway.db.models import Session
from gateway.services.warm_pool import READY, STARTING, slot_counts


def register_gauges(app: FastAPI) -> None:
    """Pool use, executor queues, hub subscriptions, ledger lag, sessions by status, tasks."""
    state = app.state
    m = state.metrics
    m.gauge(
        "ccgate_db_pool_in_use",
        "Database connections checked out",
        [],
        lambda: [({}, float(pool_in_use(state.engine)))],
    )
    pools = [state.runtime.pool, state.store.pool]
    m.gauge(
        "ccgate_executor_queued",
        "Blocking calls waiting for a thread, by pool",
        ["pool"],
        lambda: [({"pool": p.name}, float(p.queued)) for p in pools],
    )
    m.gauge(
        "ccgate_executor_running",
        "Blocking calls running, by pool",
        ["pool"],
        lambda: [({"pool": p.name}, float(p.running)) for p in pools],
    )
    m.gauge(
        "ccgate_hub_subscriptions",
        "Local followers of session streams (WebSocket, SSE, waiters)",
        [],
        lambda: [({}, float(state.hub.subscription_count))],
    )
    m.gauge(
        "ccgate_hub_channels",
        "Sessions this process is subscribed to",
        [],
        lambda: [({}, float(state.hub.channel_count))],
    )
    network = state.sessions.network
    m.gauge(
        "ccgate_sessions_firewall",
        "1 when the host firewall limits session containers to the gateway and Redis",
        [],
        lambda: [({}, 1.0 if network is not None and network.firewall_active else 0.0)],
    )
    m.gauge(
        "ccgate_collector_queue",
        "Artifact collection jobs waiting",
        [],
        lambda: [({}, float(state.ledger.collector.depth))],
    )
    m.gauge(
        "ccgate_task_up",
        "1 while a supervised background task runs, 0 while it is down",
        ["task"],
        lambda: [
            ({"task": s.name}, 1.0 if s.running else 0.0) for s in state.supervisor.states.values()
        ],
    )

    async def lag() -> list[tuple[dict[str, str], float]]:
        values = await state.ledger.lag()
        return [
            ({"measure": "total"}, float(sum(values.values()))),
            ({"measure": "max"}, float(max(values.values(), default=0))),
            ({"measure": "sessions"}, float(len(values))),
        ]

    m.async_gauge(
        "ccgate_ledger_lag_events",
        "Stream entries not yet persisted (total and worst session), and sessions read",
        ["measure"],
        lag,
    )

    async def by_status() -> list[tuple[dict[str, str], float]]:
        async with state.db_factory() as db:
            rows = await db.exec(select(Session.status, func.count()).group_by(Session.status))
            return [({"status": s.value}, float(n)) for s, n in rows.all()]

    m.async_gauge("ccgate_sessions", "Sessions by status", ["status"], by_status)
    sandboxes = state.sessions.sandboxes
    if sandboxes is not None:
        m.async_gauge(
            "ccgate_network_sandboxes_ready",
            "Network sandboxes ready to be joined, by network",
            ["network"],
            sandboxes.ready_counts,
        )

    async def pool_size() -> list[tuple[dict[str, str], float]]:
        async with state.db_factory() as db:
            counts = await slot_counts(db)
        profiles = [p.name for p in state.sessions.pool_profiles]
        return [
            ({"profile": name, "status": status}, float(counts.get((name, status), 0)))
            for name in profiles
            for status in (READY, STARTING)
        ]

    m.async_gauge(
        "ccgate_pool_containers",
        "Unclaimed warm-pool containers by profile and status (ready: CLI initialized)",
        ["profile", "status"],
        pool_size,
    )
