"""Callbacks: POST a child's results to the URL given at spawn time (retried, best effort)."""

from __future__ import annotations

import logging
from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from wrapper.protocol import EventType

logger = logging.getLogger(__name__)


async def post_callback(url: str, event: EventType, payload: dict[str, Any]) -> None:
    """POST ``{"event": <child_* type>, **payload}`` as JSON; 3 tries, then log and drop."""
    body = {"event": event.value, **payload}
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(httpx.HTTPError),
            stop=stop_after_attempt(3),
            wait=wait_exponential(multiplier=0.5, max=5),
            reraise=True,
        ):
            with attempt:
                async with httpx.AsyncClient(timeout=10) as client:
                    response = await client.post(url, json=body)
                    response.raise_for_status()
    except httpx.HTTPError as exc:
        logger.warning("callback to %s failed: %s", url, exc)
