"""Live event stream of a session over WebSocket.

Auth: ``Authorization: Bearer <jwt>``, ``?token=<jwt>``, or the subprotocol pair
``["bearer", "<jwt>"]`` (the server answers with the subprotocol ``bearer``).
``?after_seq=N`` replays every retained event with seq > N, then streams live, in seq order,
with no gap and no duplicate.

Server -> client: event envelopes ``{seq, session_id, turn_id, ts, type, source, data}``;
replies without ``seq``: ``{"type":"ack","message_id"}``, ``{"type":"pong"}``,
``{"type":"error","detail"}``, ``{"type":"gap","from_seq","to_seq"}``.
Client -> server: ``{"type":"prompt","prompt":...,"timeout_seconds"?,"queue"?}``,
``{"type":"interrupt"}``, ``{"type":"ping"}``.
Close codes: 4401 bad or missing token, 4404 unknown session, 4429 client too slow (resume with
after_seq), 1013 the user's rate limit is spent (try again later), 1009 a message over
CCGATE_MAX_REQUEST_BYTES, 1011 a dependency failed. A prompt over the rate limit is answered
``{"type":"error","code":"rate_limited","retry_after":N}`` and the socket stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.websockets import WebSocketState

from gateway.api.events import MAX_SEQ
from gateway.auth import InvalidToken, Principal, decode_token
from gateway.errors import GatewayError, NotFound, RateLimited
from gateway.schemas import ChatRequest
from gateway.services.events import SlowConsumer, follow_session
from gateway.services.history import archive_reader
from gateway.services.sessions import SessionService

logger = logging.getLogger(__name__)
router = APIRouter(tags=["stream"])

CLOSE_UNAUTHORIZED = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_SLOW_CONSUMER = 4429
CLOSE_DEPENDENCY = 1011
CLOSE_TRY_LATER = 1013
_SUBPROTOCOL_NAMES = ("bearer", "ccgate.bearer")


def _token_from(websocket: WebSocket) -> tuple[str | None, str | None]:
    """(token, subprotocol to echo) from header, query or subprotocol list."""
    header = websocket.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip(), None
    if websocket.query_params.get("token"):
        return websocket.query_params["token"], None
    offered: list[str] = list(websocket.scope.get("subprotocols") or [])
    marker = next((p for p in offered if p in _SUBPROTOCOL_NAMES), None)
    if marker is not None:
        others = [p for p in offered if p not in _SUBPROTOCOL_NAMES]
        if others:
            return others[0], marker
    return None, None


@router.websocket("/sessions/{session_id}/stream")
async def session_stream(websocket: WebSocket, session_id: str) -> None:
    """Replay after ``after_seq``, then live events; accepts prompt/interrupt/ping messages."""
    state = websocket.app.state
    token, subprotocol = _token_from(websocket)
    try:
        after_seq = int(websocket.query_params.get("after_seq", "0"))
    except ValueError:
        after_seq = -1
    if not 0 <= after_seq <= MAX_SEQ:
        after_seq = -1
    await websocket.accept(subprotocol=subprotocol)
    if after_seq < 0:
        await websocket.close(code=1008, reason=f"after_seq must be an integer 0..{MAX_SEQ}")
        return
    if token is None:
        await websocket.close(code=CLOSE_UNAUTHORIZED, reason="missing bearer token")
        return
    try:
        principal = decode_token(token, key=state.jwt_key)
        await state.rate_limiter.hit(principal.user)
    except InvalidToken as exc:
        await websocket.close(code=CLOSE_UNAUTHORIZED, reason=f"invalid token: {exc}"[:120])
        return
    except RateLimited as exc:
        await websocket.close(code=CLOSE_TRY_LATER, reason=exc.message[:120])
        return
    service: SessionService = state.sessions
    try:
        async with state.db_factory() as db:
            await service.authorize(
                db=db, principal=principal, session_id=session_id, allow_self=False
            )
    except NotFound:
        await websocket.close(code=CLOSE_NOT_FOUND, reason=f"session {session_id} not found")
        return

    send_lock = asyncio.Lock()

    async def send(text: str) -> None:
        async with send_lock:
            await websocket.send_text(text)

    overflow = asyncio.Event()

    async def pump_events() -> None:
        async for raw in follow_session(
            service.hub,
            state.redis,
            session_id,
            after_seq=after_seq,
            archive=archive_reader(state.db_factory),
            overflow=overflow,
        ):
            await send(raw.decode("utf-8", errors="replace"))

    async def watch_overflow() -> None:
        # The pump may be blocked sending to this very client: cut it off from here.
        await overflow.wait()
        logger.warning("session %s: a client fell behind its buffer; disconnecting it", session_id)
        state.metrics.slow_consumers.inc()
        raise SlowConsumer("the client fell a whole buffer behind; resume with after_seq")

    async def read_client() -> None:
        while True:
            text = await websocket.receive_text()
            reply = await _handle_client_message(text, service, state, principal, session_id)
            if reply is not None:
                await send(json.dumps(reply))

    tasks = [
        asyncio.create_task(pump_events()),
        asyncio.create_task(read_client()),
        asyncio.create_task(watch_overflow()),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            failure = task.exception()
            if isinstance(failure, SlowConsumer):
                # Drop the subscription (and its buffer) now; the close frame then waits behind
                # what the transport already holds, so a client that reads again gets its
                # buffered events and then 4429.
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                with contextlib.suppress(Exception):
                    await websocket.close(code=CLOSE_SLOW_CONSUMER, reason=str(failure)[:120])
            elif isinstance(failure, GatewayError):
                await websocket.close(code=CLOSE_DEPENDENCY, reason=failure.message[:120])
            elif failure is not None and not _client_gone(websocket, failure):
                raise failure
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.close()


def _client_gone(websocket: WebSocket, failure: BaseException) -> bool:
    # Starlette raises RuntimeError for a send after the socket closed; any other RuntimeError
    # (e.g. from a dependency's client) is a bug and must not pass for a normal close.
    if isinstance(failure, WebSocketDisconnect):
        return True
    return isinstance(failure, RuntimeError) and (
        websocket.client_state != WebSocketState.CONNECTED
        or websocket.application_state != WebSocketState.CONNECTED
    )


async def _handle_client_message(
    text: str, service: SessionService, state: Any, principal: Principal, session_id: str
) -> dict[str, Any] | None:
    try:
        message = json.loads(text)
        kind = message.get("type") if isinstance(message, dict) else None
    except ValueError:
        return {"type": "error", "detail": "messages must be JSON objects"}
    if kind == "ping":
        return {"type": "pong"}
    try:
        if kind == "prompt":
            await state.rate_limiter.hit(principal.user)
        async with state.db_factory() as db:
            session = await service.authorize(
                db=db, principal=principal, session_id=session_id, allow_self=False
            )
            if kind == "prompt":
                body = ChatRequest.model_validate(
                    {k: message[k] for k in ("prompt", "timeout_seconds", "queue") if k in message}
                )
                turn = await service.chat(
                    db=db,
                    session=session,
                    prompt=body.prompt,
                    timeout_s=body.timeout_seconds,
                    queue=body.queue,
                )
                return {"type": "ack", "message_id": turn.id, "id": message.get("id")}
            if kind == "interrupt":
                await service.interrupt(session=session)
                return {"type": "ack", "interrupt": True, "id": message.get("id")}
    except ValidationError as exc:
        return {"type": "error", "detail": exc.errors(include_url=False)[0]["msg"]}
    except RateLimited as exc:
        return {
            "type": "error",
            "detail": exc.message,
            "code": exc.code,
            "retry_after": exc.retry_after_s,
            "id": message.get("id"),
        }
    except GatewayError as exc:
        return {"type": "error", "detail": exc.message, "code": exc.code}
    return {"type": "error", "detail": "type must be one of prompt, interrupt, ping"}
