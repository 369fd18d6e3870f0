"""Per-user request rate limits, shared by every replica through Redis.

Built on the ``limits`` library (moving window, Redis storage through redis-py): each API
request and each WebSocket prompt of a user takes one hit from every window of
``CCGATE_RATE_LIMIT`` (limits' notation, e.g. ``"600/minute;60/second"``). Over a limit the
caller gets RateLimited with the seconds until the window frees a slot (429 + Retry-After).

When Redis does not answer, requests are let through (a limiter must not turn a Redis blip
into an outage of every route; the routes that need Redis report it themselves), logged at
most every 30 s and counted in ``ccgate_rate_limit_errors``.
"""

from __future__ import annotations

import logging
import math
import time

from limits import RateLimitItem, parse_many
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.exceptions import RedisError

from gateway.errors import RateLimited
from gateway.metrics import Metrics

logger = logging.getLogger(__name__)


def parse_limits(spec: str) -> list[RateLimitItem]:
    """``"600/minute;60/second"`` → limit items; "" → none. Raises ValueError when malformed."""
    return list(parse_many(spec)) if spec.strip() else []


class UserRateLimiter:
    """``hit(user)`` before serving a request; a no-op when no limit is configured."""

    def __init__(self, redis_url: str, spec: str, metrics: Metrics) -> None:
        self._items = parse_limits(spec)
        self._metrics = metrics
        self._storage: RedisStorage | None = None
        self._limiter: MovingWindowRateLimiter | None = None
        if self._items:
            uri = "async+" + redis_url if not redis_url.startswith("async+") else redis_url
            self._storage = RedisStorage(
                uri,
                implementation="redispy",
                key_prefix="ccgate:ratelimit",
                socket_timeout=2,
                socket_connect_timeout=2,
            )
            self._limiter = MovingWindowRateLimiter(self._storage)
        self._last_warning = 0.0

    async def hit(self, user: str) -> None:
        """Count one request of ``user``; raises RateLimited when a window is full."""
        if self._limiter is None:
            return
        for item in self._items:
            try:
                allowed = await self._limiter.hit(item, user)
                if allowed:
                    continue
                stats = await self._limiter.get_window_stats(item, user)
            except (RedisError, OSError, TimeoutError) as exc:
                self._metrics.rate_limit_errors.inc()
                if time.monotonic() - self._last_warning > 30:
                    self._last_warning = time.monotonic()
                    logger.warning("rate limiter: redis unavailable, not limiting: %s", exc)
                return
            retry = max(1, math.ceil(stats.reset_time - time.time()))
            raise RateLimited(
                f"rate limit of {item.amount} requests per {item.multiples} "
                f"{item.GRANULARITY.name} exceeded for user {user[:60]}; retry in {retry} s",
                retry_after_s=retry,
            )
