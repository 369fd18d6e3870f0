"""Chat resource: prompts, their results, interrupts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status

from gateway.db.models import Turn, as_utc
from gateway.deps import CurrentUser, DbDep, OwnedSession, ServiceDep, authorize
from gateway.schemas import ChatAccepted, ChatRequest, ChatResult, MessagePublic, WaitRequest

router = APIRouter(prefix="/sessions/{session_id}", tags=["chat"])

_WAIT_MARGIN_S = 30.0


def chat_result(turn: Turn) -> ChatResult:
    """The result view of a finished turn."""
    return ChatResult(
        message_id=turn.id,
        status=turn.status.value,
        subtype=turn.subtype,
        is_error=bool(turn.is_error),
        result=turn.result,
        errors=turn.errors,
        duration_ms=turn.duration_ms,
        num_turns=turn.num_turns,
        total_cost_usd=turn.total_cost_usd,
        cost_usd=turn.cost_usd,
        usage=turn.usage,
        outcome=turn.outcome,
        terminal_reason=turn.terminal_reason,
    )


@router.post(
    "/chat",
    status_code=status.HTTP_202_ACCEPTED,
    responses={200: {"model": ChatResult, "description": "stream=false: the turn's result"}},
)
async def chat(
    session_id: str,
    body: ChatRequest,
    user: CurrentUser,
    request: Request,
    response: Response,
    db: DbDep,
    service: ServiceDep,
    queue: Annotated[
        bool, Query(description="keep the prompt if the session cannot resume now")
    ] = False,
) -> ChatAccepted | ChatResult:
    """Send a prompt. Queued in order while the session starts or another turn runs; on a
    paused session it resumes the session (429 with Retry-After when there is no room for its
    container, unless ``?queue=true`` or ``queue`` in the body keeps the prompt until there is).

    ``stream=true`` (default): 202 with the ``message_id``; events carry it as ``turn_id``.
    ``stream=false``: waits and returns the result (504 if it takes longer than the timeout).
    """
    if body.stream and user.session_scope is None:
        # The owner's prompt in one statement; anything it does not take (a session token, a
        # refusal) goes the whole way below, which authorizes and says why.
        quick = await service.chat_as_owner(
            db=db,
            owner=user.user,
            session_id=session_id,
            prompt=body.prompt,
            timeout_s=body.timeout_seconds,
            queue=queue or body.queue,
        )
        if quick is not None:
            return ChatAccepted(message_id=quick.id)
    session = await authorize(request, session_id, user, allow_self=False)
    turn = await service.chat(
        db=db,
        session=session,
        prompt=body.prompt,
        timeout_s=body.timeout_seconds,
        queue=queue or body.queue,
    )
    if body.stream:
        return ChatAccepted(message_id=turn.id)
    timeout_s = (
        body.timeout_seconds
        or session.config.get("timeout_seconds")
        or request.app.state.settings.default_chat_timeout_s
    )
    done = await service.wait_for_turn(
        session_id=session.id, turn_id=turn.id, timeout_s=timeout_s + _WAIT_MARGIN_S
    )
    response.status_code = status.HTTP_200_OK
    return chat_result(done)


@router.get("/messages/{message_id}")
async def get_message(
    message_id: str, session: OwnedSession, db: DbDep, service: ServiceDep
) -> MessagePublic:
    """One prompt's status (queued, running, completed, failed, interrupted, cancelled) and
    result."""
    turn = await service.get_message(db=db, session=session, message_id=message_id)
    return MessagePublic(
        **chat_result(turn).model_dump(),
        session_id=turn.session_id,
        prompt=turn.prompt,
        created_at=as_utc(turn.created_at) or turn.created_at,
        started_at=as_utc(turn.started_at),
        completed_at=as_utc(turn.completed_at),
    )


@router.post("/wait", responses={504: {"description": "still running after the timeout"}})
async def wait_for_result(
    body: WaitRequest, session: OwnedSession, service: ServiceDep
) -> ChatResult:
    """Wait for the session's latest turn to finish and be recorded (result and artifacts),
    then return its result (the ccgate MCP tool ``wait_for_result`` uses this); 409 when the
    session has no turn yet. Holds no database connection while it waits."""
    turn = await service.latest_turn(session=session)
    done = await service.wait_for_turn(
        session_id=session.id, turn_id=turn.id, timeout_s=body.timeout_seconds
    )
    return chat_result(done)


@router.post("/interrupt", status_code=status.HTTP_202_ACCEPTED)
async def interrupt(session: OwnedSession, service: ServiceDep) -> dict[str, str]:
    """Interrupt the running turn; its result arrives with subtype error_during_execution."""
    await service.interrupt(session=session)
    return {"session_id": session.id, "status": "interrupt_requested"}
