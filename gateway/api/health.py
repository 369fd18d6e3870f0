"""Health: liveness, readiness (real checks of every dependency and every supervised task)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request, Response, status
from sqlalchemy import text

from gateway.schemas import Check, HealthPublic

router = APIRouter(tags=["health"])

_CHECK_TIMEOUT_S = 3.0


async def _check(probe: Callable[[], Awaitable[object]]) -> Check:
    try:
        await asyncio.wait_for(probe(), _CHECK_TIMEOUT_S)
    except TimeoutError:
        return Check(ok=False, detail=f"no answer in {_CHECK_TIMEOUT_S:g}s")
    except Exception as exc:
        return Check(ok=False, detail=str(getattr(exc, "message", None) or exc)[:500])
    return Check(ok=True, detail="ok")


async def _dependencies(request: Request) -> dict[str, Check]:
    state = request.app.state

    async def database() -> None:
        async with state.db_factory() as db:
            await db.exec(text("SELECT 1"))

    names = ("database", "redis", "storage", "docker")
    results = await asyncio.gather(
        _check(database),
        _check(state.redis.ping),
        _check(state.store.ping),
        _check(state.runtime.ping),
    )
    return dict(zip(names, results, strict=True))


def _tasks(request: Request) -> Check:
    down = request.app.state.supervisor.down()
    if down:
        return Check(ok=False, detail=f"background tasks down: {', '.join(sorted(down))}")
    return Check(ok=True, detail="ok")


@router.get("/health", responses={503: {"model": HealthPublic}})
async def health(request: Request, response: Response) -> HealthPublic:
    """200 when database, redis, storage and docker all answer; 503 naming the failures."""
    checks = await _dependencies(request)
    healthy = all(c.ok for c in checks.values())
    if not healthy:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return HealthPublic(status="ok" if healthy else "degraded", checks=checks)


@router.get("/health/live")
async def live() -> dict[str, str]:
    """200 while the process serves requests (restart it when this fails)."""
    return {"status": "ok"}


@router.get("/health/ready", responses={503: {"model": HealthPublic}})
async def ready(request: Request, response: Response) -> HealthPublic:
    """200 when every dependency answers and every supervised background task (event hub,
    ledger, collectors, reaper) is running; 503 naming what is not (take the replica out of
    the load balancer)."""
    checks = await _dependencies(request)
    checks["tasks"] = _tasks(request)
    healthy = all(c.ok for c in checks.values())
    if not healthy:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return HealthPublic(status="ok" if healthy else "degraded", checks=checks)
