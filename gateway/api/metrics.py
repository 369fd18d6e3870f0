"""Prometheus metrics (text exposition format), unauthenticated like /health: keep the port
private or scrape through a proxy."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Every ccgate_* metric of this process; see README "Observability"."""
    registry = request.app.state.metrics
    await registry.refresh_async()
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
