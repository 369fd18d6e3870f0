"""The API map: one router per resource, all under /api/v1 (health also at /health;
claude-code-ops' ``/api/tasks`` is included by the app beside it)."""

from fastapi import APIRouter

from gateway.api import (
    artifacts,
    chat,
    events,
    family,
    health,
    jobs,
    mcp_profiles,
    repositories,
    sessions,
    stream,
    usage,
)
from gateway.schemas import API_ERRORS

api_router = APIRouter(prefix="/api/v1", responses=API_ERRORS)
api_router.include_router(sessions.router)
api_router.include_router(chat.router)
api_router.include_router(family.router)
api_router.include_router(stream.router)
api_router.include_router(events.router)
api_router.include_router(artifacts.router)
api_router.include_router(usage.router)
api_router.include_router(repositories.router)
api_router.include_router(jobs.router)
api_router.include_router(mcp_profiles.router)
api_router.include_router(health.router)

__all__ = ["api_router", "health"]
