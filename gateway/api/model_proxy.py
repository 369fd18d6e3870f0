"""The model proxy's HTTP face: ``/model/*``, called by the CLI inside session containers.

Not part of the public API (left out of the OpenAPI document): it speaks the Anthropic Messages
API, authenticated by the session's model credential, not by a ccgate JWT. The logic is in
``gateway/services/model_proxy.py``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from gateway.services.model_proxy import ModelProxy

router = APIRouter(prefix="/model", include_in_schema=False)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is longer than ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


@router.api_route("/{path:path}", methods=["GET", "HEAD", "POST"])
async def proxy(path: str, request: Request) -> Response:
    """Forward one Messages API call upstream with the deployment's key (metered, budgeted)."""
    model_proxy: ModelProxy = request.app.state.model_proxy

    async def read_body(limit: int) -> bytes | None:
        return await _read_body(request, limit)

    answer = await model_proxy.handle(
        method=request.method,
        path="/" + path,
        query=request.url.query,
        headers=request.headers,
        read_body=read_body,
    )
    if answer.stream is not None:
        return StreamingResponse(
            answer.stream, status_code=answer.status_code, headers=answer.headers
        )
    return Response(answer.body, status_code=answer.status_code, headers=answer.headers)
