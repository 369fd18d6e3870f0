"""Scripted model server: a deterministic Messages-API server for the real Claude Code CLI.

The CLI talks to it through ``ANTHROPIC_BASE_URL`` (``POST /v1/messages?beta=true``, SSE when the
body says ``"stream": true``, a JSON Message otherwise). Wire formats follow
platform.claude.com/docs/build-with-claude/streaming and the captures in
shared/reference/samples. The reply is chosen by the first word of the turn's prompt:

==========================  ================================================================
prompt                      reply
==========================  ================================================================
``write PATH [TEXT]``       Write tool: ``/workspace/PATH`` with TEXT (default a fixed line)
``bash COMMAND``            Bash tool, then a text reply quoting the tool's output
``multi``                   two tool calls in one response (Write + Bash), then a Read, then text
``braces``                  text with braces, quotes, backslashes and unicode
``recall``                  "You first said: <first prompt of the conversation>"
``slow [SECONDS]``          text streamed in small pieces for SECONDS (default 30), with pings
``fail STATUS``             HTTP STATUS (529 overloaded, 500 api error, 429, 401, 400)
``timed COUNT MS``          COUNT text deltas, one every MS milliseconds, each the server's
                            ``time.time()`` when sent (for measuring per-chunk latency)
``big BYTES``               one text reply of BYTES characters (long stream-json lines)
``deltas COUNT``            one text reply streamed as COUNT deltas of 4 characters (a burst of
                            partial-message events)
``spawn [MODE] PROMPT``     the ccgate MCP tools: spawn_session(PROMPT, workspace MODE), then
                            wait_for_result, then "Child said: <its result>" (or
                            "Spawn failed: <tool error>"); MODE is inherit, clone or ephemeral
anything else               "Echo: <prompt>"
==========================  ================================================================

Every response reports usage (input tokens = characters/4 of the request's messages, output tokens
= characters/4 of the reply), so the CLI computes a non-zero ``total_cost_usd``.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

DEFAULT_WRITE_TEXT = "hello from the scripted model\n"
BRACES_TEXT = (
    'Braces {not json} and JSON {"key": "va}lue", "q": "\\"quoted\\"", "b": "\\\\"} '
    "and a lone } plus { — unicode: héllo wörld 日本語 🚀 \u2028 end"
)
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass
class Block:
    """One content block of a scripted reply."""

    kind: str  # "text" | "tool_use"
    text: str = ""
    name: str = ""
    input: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: f"toolu_{uuid.uuid4().hex[:24]}")


@dataclass
class Reply:
    """A scripted reply: content blocks, or an HTTP error; ``slow_s`` streams text slowly;
    ``delta_size`` streams text in deltas of that many characters (default 64 KiB)."""

    blocks: list[Block] = field(default_factory=list)
    error_status: int | None = None
    slow_s: float = 0.0
    delta_size: int = 65536
    timed: tuple[int, float] | None = None
    """(count, interval in seconds): deltas stamped with the time they were sent."""

    @property
    def stop_reason(self) -> str:
        """``tool_use`` when any block is a tool call, else ``end_turn``."""
        return "tool_use" if any(b.kind == "tool_use" for b in self.blocks) else "end_turn"


def _text_of(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    texts: list[str] = []
    for block in content or []:
        if isinstance(block, dict) and block.get("type") == "text":
            texts.append(str(block.get("text", "")))
    return texts


def _user_prompt(message: dict[str, Any]) -> str | None:
    """The user's own text in a message (last text block that is not a system reminder)."""
    if message.get("role") != "user":
        return None
    texts = [t for t in _text_of(message.get("content")) if not t.startswith("<system-reminder>")]
    return texts[-1].strip() if texts else None


_REMINDER = re.compile(r"<system-reminder>.*?</system-reminder>", re.DOTALL)


def _tool_results(message: dict[str, Any]) -> list[str]:
    """Tool outputs in a message, without the CLI's injected system reminders."""
    out: list[str] = []
    content = message.get("content")
    if isinstance(content, list):
        for block in content:
            if isinstance(block, dict) and block.get("type") == "tool_result":
                inner = block.get("content")
                text = inner if isinstance(inner, str) else " ".join(_text_of(inner))
                out.append(_REMINDER.sub("", text).strip())
    return out


def script_reply(body: dict[str, Any]) -> Reply:
    """Choose the reply for one Messages API request body (pure; unit-tested)."""
    messages = [m for m in body.get("messages", []) if isinstance(m, dict)]
    if not body.get("tools"):
        # Side requests (titles, summaries, warmups) carry no tools: answer harmlessly.
        return Reply([Block("text", text="OK")])
    prompts = [(i, p) for i, m in enumerate(messages) if (p := _user_prompt(m)) is not None]
    if not prompts:
        return Reply([Block("text", text="Hello.")])
    index, prompt = prompts[-1]
    step = sum(1 for m in messages[index + 1 :] if m.get("role") == "assistant")
    last_results = _tool_results(messages[-1]) if messages else []
    word, _, rest = prompt.partition(" ")
    word = word.lower()
    rest = rest.strip()

    if word == "write" and rest:
        path, _, text = rest.partition(" ")
        if step == 0:
            return Reply(
                [
                    Block("text", text=f"I'll write {path}."),
                    Block(
                        "tool_use",
                        name="Write",
                        input={
                            "file_path": f"/workspace/{path.lstrip('/')}",
                            "content": text + "\n" if text else DEFAULT_WRITE_TEXT,
                        },
                    ),
                ]
            )
        return Reply([Block("text", text=f"Wrote {path}.")])
    if word == "bash" and rest:
        if step == 0:
            return Reply(
                [Block("tool_use", name="Bash", input={"command": rest, "description": "Run it"})]
            )
        return Reply([Block("text", text="Output: " + " ".join(last_results).strip())])
    if word == "multi":
        if step == 0:
            return Reply(
                [
                    Block("text", text="Two tools at once."),
                    Block(
                        "tool_use",
                        name="Write",
                        input={"file_path": "/workspace/multi-a.txt", "content": "alpha\n"},
                    ),
                    Block(
                        "tool_use",
                        name="Bash",
                        input={"command": "echo beta > /workspace/multi-b.txt && echo done"},
                    ),
                ]
            )
        if step == 1:
            return Reply(
                [Block("tool_use", name="Read", input={"file_path": "/workspace/multi-a.txt"})]
            )
        return Reply([Block("text", text="Multi done.")])
    if word == "spawn" and rest:
        return _spawn_reply(rest, step, last_results)
    if word == "tool" and rest:
        # Any tool by name (an MCP server's: mcp__<server>__<tool>) with a JSON input.
        name, _, raw = rest.partition(" ")
        if step == 0:
            try:
                payload = json.loads(raw) if raw else {}
            except ValueError:
                payload = {}
            return Reply([Block("tool_use", name=name, input=payload)])
        return Reply([Block("text", text="Output: " + " ".join(last_results).strip())])
    if word == "structured" and rest:
        # --json-schema: the CLI offers a StructuredOutput tool taking the schema's object.
        if step == 0:
            try:
                payload = json.loads(rest)
            except ValueError:
                payload = {"text": rest}
            return Reply([Block("tool_use", name="StructuredOutput", input=payload)])
        return Reply([Block("text", text="Structured output given.")])
    if word == "braces":
        return Reply([Block("text", text=BRACES_TEXT)])
    if word == "recall":
        return Reply([Block("text", text=f"You first said: {prompts[0][1]}")])
    if word == "slow":
        seconds = float(rest) if rest.replace(".", "", 1).isdigit() else 30.0
        return Reply([Block("text", text="")], slow_s=seconds)
    if word == "fail":
        status = int(rest) if rest.isdigit() else 500
        return Reply(error_status=status)
    if word == "deltas":
        count = int(rest) if rest.isdigit() else 15_000
        return Reply([Block("text", text="".join(f"{n % 10000:04d}" for n in range(count)))],
                     delta_size=4)  # fmt: skip
    if word == "timed":
        deltas, _, ms = rest.partition(" ")
        interval = float(ms) / 1000 if ms.replace(".", "", 1).isdigit() else 0.005
        return Reply(
            [Block("text", text="")], timed=(int(deltas) if deltas.isdigit() else 100, interval)
        )
    if word == "big":
        size = int(rest) if rest.isdigit() else 1_500_000
        return Reply([Block("text", text=("0123456789abcdef" * (size // 16 + 1))[:size])])
    return Reply([Block("text", text=f"Echo: {prompt}")])


def _spawn_reply(rest: str, step: int, last_results: list[str]) -> Reply:
    mode, _, child_prompt = rest.partition(" ")
    if mode not in ("inherit", "clone", "ephemeral"):
        mode, child_prompt = "ephemeral", rest
    if step == 0:
        return Reply(
            [
                Block(
                    "tool_use",
                    name="mcp__ccgate__spawn_session",
                    input={"prompt": child_prompt, "workspace": mode},
                )
            ]
        )
    text = " ".join(last_results).strip()
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if step == 1:
        if not isinstance(payload, dict) or "child_session_id" not in payload:
            return Reply([Block("text", text=f"Spawn failed: {text}")])
        return Reply(
            [
                Block(
                    "tool_use",
                    name="mcp__ccgate__wait_for_result",
                    input={"session_id": payload["child_session_id"], "timeout_seconds": 120},
                )
            ]
        )
    result = payload.get("result") if isinstance(payload, dict) else text
    return Reply([Block("text", text=f"Child said: {result}")])


def _tokens(chars: int) -> int:
    return max(1, chars // 4)


def _usage(body: dict[str, Any], output_chars: int) -> tuple[dict[str, int], int]:
    input_tokens = _tokens(len(json.dumps(body.get("messages", []))))
    return (
        {
            "input_tokens": input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 1,
        },
        _tokens(output_chars),
    )


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def _stream(body: dict[str, Any], reply: Reply) -> AsyncIterator[bytes]:
    msg_id = f"msg_{uuid.uuid4().hex[:24]}"
    out_chars = sum(len(b.text) + len(json.dumps(b.input)) for b in reply.blocks)
    usage, output_tokens = _usage(body, out_chars)
    yield _sse(
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": msg_id,
                "type": "message",
                "role": "assistant",
                "model": body.get("model", "claude-sonnet-4-5"),
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": usage,
            },
        },
    )
    yield _sse("ping", {"type": "ping"})
    for index, block in enumerate(reply.blocks):
        if block.kind == "text":
            yield _sse(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            if reply.timed:
                count, interval = reply.timed
                for _ in range(count):
                    await asyncio.sleep(interval)
                    delta = {"type": "text_delta", "text": f"{time.time():.6f};"}
                    yield _sse(
                        "content_block_delta",
                        {"type": "content_block_delta", "index": index, "delta": delta},
                    )
            if reply.slow_s:
                ticks = max(1, int(reply.slow_s / 0.25))
                for n in range(ticks):
                    await asyncio.sleep(0.25)
                    yield _sse("ping", {"type": "ping"})
                    delta = {"type": "text_delta", "text": f"tick {n} "}
                    yield _sse(
                        "content_block_delta",
                        {"type": "content_block_delta", "index": index, "delta": delta},
                    )
            text = block.text
            step = reply.delta_size
            for start in range(0, len(text), step):
                delta = {"type": "text_delta", "text": text[start : start + step]}
                yield _sse(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
        else:
            yield _sse(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {
                        "type": "tool_use",
                        "id": block.id,
                        "name": block.name,
                        "input": {},
                    },
                },
            )
            raw = json.dumps(block.input)
            half = len(raw) // 2
            for piece in (raw[:half], raw[half:]):
                yield _sse(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": piece},
                    },
                )
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
    yield _sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": reply.stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        },
    )
    yield _sse("message_stop", {"type": "message_stop"})


def _message_json(body: dict[str, Any], reply: Reply) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    for block in reply.blocks:
        if block.kind == "text":
            content.append({"type": "text", "text": block.text})
        else:
            content.append(
                {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
            )
    out_chars = sum(len(b.text) + len(json.dumps(b.input)) for b in reply.blocks)
    usage, output_tokens = _usage(body, out_chars)
    usage["output_tokens"] = output_tokens
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "claude-sonnet-4-5"),
        "content": content,
        "stop_reason": reply.stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }


async def messages(request: Request) -> Response:
    """``POST /v1/messages``: the scripted reply as SSE or as one JSON Message."""
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse(
            {
                "type": "error",
                "error": {"type": "invalid_request_error", "message": "body is not JSON"},
            },
            status_code=400,
        )
    request.app.state.requests.append(body)
    request.app.state.headers.append(dict(request.headers))
    reply = script_reply(body)
    if reply.error_status is not None:
        status = reply.error_status
        return JSONResponse(
            {
                "type": "error",
                "error": {
                    "type": _ERROR_TYPES.get(status, "api_error"),
                    "message": f"scripted failure {status}",
                },
            },
            status_code=status,
        )
    if body.get("stream"):
        return StreamingResponse(_stream(body, reply), media_type="text/event-stream")
    return JSONResponse(_message_json(body, reply))


async def hello(request: Request) -> Response:
    """``/api/hello``: the CLI's connectivity probe."""
    return Response(status_code=200)


async def models(request: Request) -> Response:
    """``GET /v1/models``: a minimal model list."""
    return JSONResponse(
        {
            "data": [
                {"type": "model", "id": "claude-sonnet-4-5", "display_name": "Claude Sonnet 4.5"}
            ]
        }
    )


def create_app() -> Starlette:
    """The scripted model ASGI app; ``app.state.requests`` records every request body and
    ``app.state.headers`` its headers."""
    app = Starlette(
        routes=[
            Route("/v1/messages", messages, methods=["POST"]),
            Route("/api/hello", hello, methods=["GET", "HEAD"]),
            Route("/v1/models", models, methods=["GET"]),
        ]
    )
    app.state.requests = []
    app.state.headers = []
    return app


class ScriptedModelServer:
    """Runs the scripted model in a background thread (for tests and the quickstart demo)."""

    def __init__(self, host: str = "0.0.0.0", port: int = 0) -> None:
        self.app = create_app()
        config = uvicorn.Config(self.app, host=host, port=port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="scripted-model", daemon=True)

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every request body received so far."""
        return list(self.app.state.requests)

    @property
    def headers(self) -> list[dict[str, str]]:
        """The headers of every ``/v1/messages`` request so far (names lower-case)."""
        return list(self.app.state.headers)

    @property
    def port(self) -> int:
        """The bound port (after start)."""
        sockets = self._server.servers[0].sockets
        return int(sockets[0].getsockname()[1])

    def start(self, timeout_s: float = 10.0) -> ScriptedModelServer:
        """Start and wait until it listens; raises RuntimeError if it does not."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("scripted model server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop and join the thread."""
        self._server.should_exit = True
        self._thread.join(timeout=10)


def serve(host: str, port: int) -> None:
    """Run in the foreground (``ccgate scripted-model``)."""
    uvicorn.run(create_app(), host=host, port=port, log_level="info")
