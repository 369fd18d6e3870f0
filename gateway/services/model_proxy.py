"""The model proxy: the Messages API routes the CLI calls, forwarded upstream with the real key.

A session container never holds the upstream key. It gets ``ANTHROPIC_BASE_URL`` pointing here
(``<gateway>/model``) and a per-session credential as its ``ANTHROPIC_API_KEY``; the gateway
keeps only the credential's SHA-256 (``Session.proxy_key_hash``), which ``end_session`` clears,
so the credential works only through this proxy, only for its live session.

Routes (what Claude Code 2.1.x calls with ``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1``,
captured in SPEC.md): ``POST /v1/messages`` (SSE or JSON; metered and budgeted),
``POST /v1/messages/count_tokens`` and ``GET /v1/models[/id]`` (forwarded, not metered),
``HEAD|GET /api/hello`` (answered here). Anything else is a 404 ``not_found_error``, logged.

Streams pass through unbuffered: each upstream chunk is yielded as it arrives while a
:class:`StreamMeter` reads the usage off it. The request is recorded (cost, tokens, the release
of its reservation) before the ``message_stop`` chunk is passed on, so the CLI cannot finish
the turn before its cost is in the database. A stream cut short (client gone, upstream error)
is recorded in the background with what was seen. Errors answer in the Messages API's shape
(``{"type":"error","error":{"type","message"}}``) so the CLI shows them: a spent budget is a 400
(not retried), a budget fully reserved by requests in flight a 429 with ``retry-after``,
an unknown credential a 401, an unreachable upstream a 502, the database down a 503.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import httpx
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.config import Settings
from gateway.db.errors import is_outage
from gateway.metrics import Metrics
from gateway.services.metering import budgets
from gateway.services.metering.budgets import BudgetBusy, BudgetExhausted, Grant, Reservation
from gateway.services.metering.credentials import GrantCache, credential_of, proxy_key_hash
from gateway.services.metering.prices import PriceTable, Usage
from gateway.services.metering.recorder import UNKNOWN_MODEL, MeteredCall, Recorder
from gateway.services.metering.usage import StreamMeter, message_usage

logger = logging.getLogger(__name__)

_FORWARD_REQUEST = {"anthropic-version", "anthropic-beta", "content-type", "user-agent", "x-app"}
_HOP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "content-length", "set-cookie"}
_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    502: "api_error",
    503: "api_error",
}


@dataclass
class ProxyResponse:
    """What the route sends: a whole ``body`` or a ``stream`` of chunks."""

    status_code: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None


def api_error(status: int, message: str, headers: dict[str, str] | None = None) -> ProxyResponse:
    """An error in the Messages API's shape (the CLI prints ``error.message``)."""
    payload = {
        "type": "error",
        "error": {"type": _STATUS_TYPES.get(status, "api_error"), "message": message},
    }
    return ProxyResponse(
        status,
        {"content-type": "application/json", **(headers or {})},
        json.dumps(payload).encode(),
    )


class ModelProxy:
    """Forwards the CLI's Messages API calls upstream, metering and budgeting them.

    ``start()`` opens the upstream HTTP client, ``close()`` waits (≤ 10 s) for recordings still
    running in the background and closes it.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        db_factory: async_sessionmaker[AsyncSession],
        metrics: Metrics,
        prices: PriceTable | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._settings = settings
        self._db = db_factory
        self._metrics = metrics
        self.prices = prices or PriceTable(settings.prices)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._recorder = Recorder(db_factory, metrics, self.prices)
        self._grants = GrantCache(db_factory, ttl_s=settings.proxy_credential_cache_s)

    async def start(self) -> None:
        """Open the pooled upstream client."""
        s = self._settings
        self._client = httpx.AsyncClient(
            base_url=s.model_upstream_url,
            transport=self._transport,
            timeout=httpx.Timeout(
                connect=s.proxy_connect_timeout_s,
                read=s.proxy_read_timeout_s,
                write=s.proxy_read_timeout_s,
                pool=s.proxy_connect_timeout_s,
            ),
            limits=httpx.Limits(
                max_connections=s.proxy_max_connections,
                max_keepalive_connections=s.proxy_max_connections,
            ),
            headers=self._upstream_auth(),
        )

    async def close(self) -> None:
        """Finish background recordings (bounded) and close the client."""
        await self._recorder.close()
        if self._client is not None:
            await self._client.aclose()

    def _upstream_auth(self) -> dict[str, str]:
        s = self._settings
        if s.anthropic_auth_token is not None:
            return {"authorization": f"Bearer {s.anthropic_auth_token.get_secret_value()}"}
        if s.anthropic_api_key is not None:
            return {"x-api-key": s.anthropic_api_key.get_secret_value()}
        return {}

    async def handle(
        self,
        *,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        read_body: Callable[[int], Awaitable[bytes | None]],
    ) -> ProxyResponse:
        """Answer one request to ``/model<path>``. ``read_body(limit)`` returns the body, or
        None when it is longer than ``limit`` bytes."""
        route = _route(method, path)
        response = await self._dispatch(route, method, path, query, headers, read_body)
        self._metrics.proxy_requests.labels(route=route, status=str(response.status_code)).inc()
        return response

    async def _dispatch(
        self,
        route: str,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        read_body: Callable[[int], Awaitable[bytes | None]],
    ) -> ProxyResponse:
        if route == "hello":
            return ProxyResponse(200)
        if route == "unknown":
            logger.warning("model proxy: no such route %s %s", method, path[:200])
            return api_error(404, f"ccgate model proxy: {method} {path[:200]} is not proxied")
        key = credential_of(headers)
        if key is None:
            return self._refuse("auth", 401, "ccgate: no session credential (x-api-key)")
        try:
            grant = await self._grants.get(proxy_key_hash(key))
        except (SQLAlchemyError, OSError) as exc:
            return self._db_down(exc)
        if grant is None:
            return self._refuse(
                "auth", 401, "ccgate: unknown session credential, or the session has ended"
            )
        body = await read_body(self._settings.proxy_max_request_bytes)
        if body is None:
            limit = self._settings.proxy_max_request_bytes
            return self._refuse("too_large", 413, f"ccgate: request body over {limit} bytes")
        if route != "messages":
            return await self._forward_plain(method, path, query, headers, body)
        return await self._messages(grant, path, query, headers, body)

    def _refuse(
        self, reason: str, status: int, message: str, headers: dict[str, str] | None = None
    ) -> ProxyResponse:
        self._metrics.proxy_refusals.labels(reason=reason).inc()
        return api_error(status, message, headers)

    def _db_down(self, exc: BaseException) -> ProxyResponse:
        if isinstance(exc, SQLAlchemyError) and not is_outage(exc):
            raise exc
        logger.warning("model proxy: database unavailable: %s", exc)
        return self._refuse("database", 503, "ccgate: the gateway's database is unavailable")

    async def _messages(
        self, grant: Grant, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> ProxyResponse:
        daily = self._settings.user_daily_budget_usd
        held = Reservation(day=budgets.utc_day())
        if grant.budgeted or daily is not None:
            # Only a budget needs the body parsed (model and max_tokens for the estimate);
            # otherwise it goes upstream as it came, and upstream validates it.
            try:
                request = json.loads(body)
            except ValueError:
                return self._refuse("invalid", 400, "ccgate: the request body is not JSON")
            if not isinstance(request, dict) or not isinstance(request.get("model"), str):
                return self._refuse("invalid", 400, "ccgate: the request has no model")
            model = request["model"][:200]
            max_tokens = request.get("max_tokens")
            cap = self._settings.proxy_reserve_output_tokens
            out = min(max_tokens, cap) if isinstance(max_tokens, int) and max_tokens > 0 else cap
            estimate = self.prices.estimate(model, input_tokens=len(body) // 4, output_tokens=out)
            try:
                async with self._db() as db:
                    held = await budgets.reserve(
                        db, grant, estimate_usd=estimate, user_daily_budget_usd=daily, day=held.day
                    )
            except BudgetExhausted as exc:
                return self._refuse("budget_exhausted", 400, str(exc))
            except BudgetBusy as exc:
                return self._refuse("budget_busy", 429, str(exc), {"retry-after": "1"})
            except (SQLAlchemyError, OSError) as exc:
                return self._db_down(exc)
        else:
            model = _sniff_model(body)
        call = MeteredCall(grant, held, model, path, False, time.monotonic())
        try:
            upstream = await self._send("POST", path, query, headers, body)
        except httpx.HTTPError as exc:
            await self._recorder.record(
                call, Usage(), status=502, error=f"upstream: {exc!r}"[:2000]
            )
            return api_error(502, f"ccgate: the model API is unreachable ({type(exc).__name__})")
        self._metrics.proxy_first_byte_seconds.observe(time.monotonic() - call.started)
        out_headers = _response_headers(upstream.headers)
        if upstream.status_code == 200 and upstream.headers.get("content-type", "").startswith(
            "text/event-stream"
        ):
            call.stream = True
            return ProxyResponse(200, out_headers, stream=self._relay(call, upstream))
        try:
            content = await _read_bounded(upstream, self._settings.proxy_max_response_bytes)
        except httpx.HTTPError as exc:
            await self._recorder.record(
                call, Usage(), status=502, error=f"upstream: {exc!r}"[:2000]
            )
            return api_error(502, f"ccgate: the model API response failed ({type(exc).__name__})")
        usage, echoed = message_usage(content) if upstream.status_code == 200 else (Usage(), None)
        error = None if upstream.status_code == 200 else content[:2000].decode(errors="replace")
        await self._recorder.record(
            call, usage, status=upstream.status_code, error=error, model=echoed
        )
        return ProxyResponse(upstream.status_code, out_headers, content)

    async def _send(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> httpx.Response:
        assert self._client is not None, "ModelProxy.start() was not called"
        forwarded = {k: v for k, v in headers.items() if k.lower() in _FORWARD_REQUEST}
        forwarded["accept-encoding"] = "identity"
        if self._settings.anthropic_auth_token is not None:
            beta = forwarded.get("anthropic-beta", "")
            if "oauth-2025-04-20" not in beta:
                forwarded["anthropic-beta"] = ",".join(b for b in (beta, "oauth-2025-04-20") if b)
        request = self._client.build_request(
            method, path + (f"?{query}" if query else ""), headers=forwarded, content=body
        )
        return await self._client.send(request, stream=True)

    async def _forward_plain(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> ProxyResponse:
        try:
            upstream = await self._send(method, path, query, headers, body)
            content = await _read_bounded(upstream, self._settings.proxy_max_response_bytes)
        except httpx.HTTPError as exc:
            return api_error(502, f"ccgate: the model API is unreachable ({type(exc).__name__})")
        return ProxyResponse(upstream.status_code, _response_headers(upstream.headers), content)

    async def _relay(self, call: MeteredCall, upstream: httpx.Response) -> AsyncIterator[bytes]:
        """Yield upstream chunks as they come; record the request before ``message_stop``."""
        meter = StreamMeter()
        recorded = False
        try:
            async for chunk in upstream.aiter_raw():
                meter.feed(chunk)
                if meter.stopped and not recorded:
                    await self._recorder.record(call, meter.usage(), status=200, model=meter.model)
                    recorded = True
                yield chunk
            if not recorded:
                await self._recorder.record(
                    call, meter.usage(), status=200, model=meter.model, error="no message_stop"
                )
                recorded = True
        except httpx.HTTPError as exc:
            error = f"upstream stream failed: {exc!r}"[:2000]
            await self._recorder.record(
                call, meter.usage(), status=200, model=meter.model, error=error
            )
            recorded = True
            raise
        finally:
            if not recorded:
                # Cancelled (the client went away): no await is safe here; record and close
                # in the background with what was seen.
                self._recorder.spawn(self._finish_cut(call, meter, upstream))
            else:
                self._recorder.spawn(upstream.aclose())

    async def _finish_cut(
        self, call: MeteredCall, meter: StreamMeter, upstream: httpx.Response
    ) -> None:
        with contextlib.suppress(Exception):
            await upstream.aclose()
        await self._recorder.record(
            call, meter.usage(), status=499, model=meter.model, error="client disconnected"
        )


_MODEL_FIELD = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')


def _sniff_model(body: bytes) -> str:
    """The request's model without parsing the whole body (the CLI sends it first); the
    upstream's answer (``message_start``) replaces it when they differ."""
    found = _MODEL_FIELD.search(body, 0, 65536)
    return found.group(1).decode(errors="replace") if found else UNKNOWN_MODEL


def _route(method: str, path: str) -> str:
    if path == "/api/hello" and method in ("GET", "HEAD"):
        return "hello"
    if path == "/v1/messages" and method == "POST":
        return "messages"
    if path == "/v1/messages/count_tokens" and method == "POST":
        return "count_tokens"
    if method == "GET" and (path == "/v1/models" or path.startswith("/v1/models/")):
        return "models"
    return "unknown"


def _response_headers(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _HOP_RESPONSE}


async def _read_bounded(response: httpx.Response, limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes (the rest is dropped and the response closed)."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > limit:
                raise httpx.DecodingError(f"upstream response over {limit} bytes")
            chunks.append(chunk)
    finally:
        await response.aclose()
    return b"".join(chunks)
