"""Request size limit for the API: bodies over ``max_bytes`` get 413 before any route runs.

A pure ASGI middleware. A declared ``Content-Length`` is checked up front; a chunked body is
read here (never more than ``max_bytes`` + one chunk) and replayed to the app, so every route
sees the same bounded body. The model proxy (``/model/``) has its own, larger limit and is
passed through untouched, as are WebSockets (their message limit is the server's
``ws_max_size``).
"""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimitMiddleware:
    """413 ``request_too_large`` for API request bodies longer than ``max_bytes``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        skip_prefixes: tuple[str, ...],
        larger: tuple[tuple[re.Pattern[str], int, str], ...] = (),
    ) -> None:
        """``larger``: (path pattern, limit, the settings that make it) for routes with their own
        larger limit (file uploads); the first pattern that matches the whole path wins."""
        self.app = app
        self.default_max_bytes = max_bytes
        self.skip_prefixes = skip_prefixes
        self.larger = larger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] != "http" or path.startswith(self.skip_prefixes):
            await self.app(scope, receive, send)
            return
        max_bytes, setting = next(
            ((limit, name) for pattern, limit, name in self.larger if pattern.fullmatch(path)),
            (self.default_max_bytes, "CCGATE_MAX_REQUEST_BYTES"),
        )
        await self._limited(scope, receive, send, max_bytes, setting)

    async def _limited(
        self, scope: Scope, receive: Receive, send: Send, max_bytes: int, setting: str
    ) -> None:
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > max_bytes:
                await self._refuse(send, max_bytes, setting)
                return
            await self.app(scope, receive, send)
            return
        if headers.get(b"transfer-encoding", b"").lower() != b"chunked":
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > max_bytes:
                await self._refuse(send, max_bytes, setting)
                return
            if not message.get("more_body"):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, max_bytes: int, setting: str) -> None:
        body = json.dumps(
            {
                "detail": f"request body over {max_bytes} bytes ({setting})",
                "code": "request_too_large",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
