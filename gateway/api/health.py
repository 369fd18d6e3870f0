"""Health: liveness, readiness (real checks of every dependency and every supervised task),
in CC-Docker's shape (``status``, ``version``, ``components``) plus ccgate's ``checks``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request, Response, status
from sqlalchemy import text

from gateway import __version__
from gateway.schemas import Check, HealthPublic, LivePublic

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


def _answer(response: Response, checks: dict[str, Check], ready: bool) -> HealthPublic:
    healthy = all(c.ok for c in checks.values())
    if not healthy:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return HealthPublic(
        status="healthy" if healthy else "unhealthy",
        version=__version__,
        ready=ready,
        components={k: "healthy" if c.ok else "unhealthy" for k, c in checks.items()},
        checks=checks,
    )


@router.get("/health", responses={503: {"model": HealthPublic}})
async def health(request: Request, response: Response) -> HealthPublic:
    """200 ``healthy`` when database, redis, storage and docker all answer; 503 ``unhealthy``
    naming the failures in ``components`` and ``checks``. ``ready`` adds the background tasks."""
    checks = await _dependencies(request)
    ready = all(c.ok for c in checks.values()) and _tasks(request).ok
    return _answer(response, checks, ready)


@router.get("/health/live")
async def live() -> LivePublic:
    """200 ``{"alive": true}`` while the process serves requests (restart it when this fails)."""
    return LivePublic(alive=True)


@router.get("/health/ready", responses={503: {"model": HealthPublic}})
async def ready(request: Request, response: Response) -> HealthPublic:
    """200 when every dependency answers and every supervised background task (event hub,
    ledger, collectors, reaper) is running; 503 naming what is not (take the replica out of
    the load balancer)."""
    checks = await _dependencies(request)
    checks["tasks"] = _tasks(request)
    return _answer(response, checks, all(c.ok for c in checks.values()))
