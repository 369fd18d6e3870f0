"""Structured logging: one configuration for the gateway's and uvicorn's loggers, a request id
on every line logged while a request is handled, JSON output when configured.

``configure_logging("json")`` prints one JSON object per line (python-json-logger) with
``time, level, logger, message, request_id`` and any ``extra`` fields; ``"text"`` prints
``time level logger [request_id] message``. :class:`RequestIdMiddleware` takes the id from the
``X-Request-ID`` header (or makes one), keeps it in a context variable for the request's
lifetime (threads of the blocking pools inherit it) and echoes it in the response.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import uuid

from pythonjsonlogger.json import JsonFormatter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
"""The id of the request being handled ("-" outside requests)."""

_HEADER = b"x-request-id"


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` from the context."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):  # an explicit extra={"request_id"} wins
            record.request_id = request_id.get()
        return True


def configure_logging(fmt: str = "text", level: str = "INFO") -> None:
    """Route the root, ``gateway``, ``uvicorn`` and ``uvicorn.access`` loggers to stderr in
    one format (idempotent: replaces the handlers it installed before)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    handler.set_name("ccgate")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "ccgate"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


class RequestIdMiddleware:
    """Pure ASGI middleware (works for HTTP and WebSocket, does not buffer streams)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(_HEADER, b"").decode("latin-1")
        rid = given[:64] if given and given.isprintable() else uuid.uuid4().hex[:16]
        token = request_id.set(rid)
        # Also on the scope: the 500 handler runs outside this middleware, after the reset.
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                headers.append((_HEADER, rid.encode("latin-1")))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
