"""What this service is: ``GET /`` and ``GET /api/v1`` (name, version, docs, endpoints), in
CC-Docker's shape so its clients find their way; no authentication."""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import APIRouter, Request

from gateway import __version__
from gateway.schemas import ServiceInfo

router = APIRouter(tags=["about"])

NAME = "ccgate"
API_PREFIX = "/api/v1"


def endpoints(paths: Iterable[str]) -> dict[str, str]:
    """{resource: path}: each top-level resource under /api/v1 (from the OpenAPI document's
    paths, so the list is never stale), plus health, metrics, docs and the OpenAPI document."""
    found: dict[str, str] = {}
    for path in paths:
        if not path.startswith(API_PREFIX + "/"):
            continue
        resource = path[len(API_PREFIX) + 1 :].split("/", 1)[0]
        if resource and not resource.startswith("{"):
            found.setdefault(resource, f"{API_PREFIX}/{resource}")
    return dict(sorted(found.items())) | {
        "health": "/health",
        "ready": "/health/ready",
        "live": "/health/live",
        "metrics": "/metrics",
        "docs": "/docs",
        "openapi": "/openapi.json",
    }


def _info(request: Request, version: str) -> ServiceInfo:
    app = request.app
    return ServiceInfo(
        name=NAME,
        version=version,
        service_version=__version__,
        docs=app.docs_url or "",
        openapi=app.openapi_url or "",
        endpoints=endpoints(app.openapi().get("paths", {})),
    )


@router.get("/")
async def root(request: Request) -> ServiceInfo:
    """The service: name, release, docs URL and endpoints."""
    return _info(request, __version__)


@router.get(API_PREFIX)
async def api_info(request: Request) -> ServiceInfo:
    """The v1 API: ``version`` is ``v1``; name, release, docs URL and endpoints."""
    return _info(request, "v1")
