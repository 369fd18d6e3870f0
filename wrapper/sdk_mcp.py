"""Serve the ccgate tools to the CLI as an SDK MCP server over the control protocol.

The CLI is started with ``--mcp-config '{"mcpServers":{"ccgate":{"type":"sdk","name":"ccgate"}}}'``
and then sends each JSON-RPC message for that server as a control request on its stdout::

    {"type":"control_request","request_id":"…","request":{"subtype":"mcp_message",
     "server_name":"ccgate","message":{…JSON-RPC…}}}

which the host answers on the CLI's stdin with ``{"type":"control_response","response":
{"subtype":"success","request_id":"…","response":{"mcp_response":{…JSON-RPC…}}}}`` — a
notification gets ``{"jsonrpc":"2.0","result":{}}`` as its acknowledgement. The CLI may withdraw
a request with ``{"type":"control_cancel_request","request_id":"…"}``, which is not answered.
Format from claude-agent-sdk-python (``_internal/query.py``, ``_handle_control_request``), checked
against the CLI in the session image.

What arrives here is the agent's doing (tool arguments are the model's output), so it is
untrusted: ``mcp_tools`` checks every argument against the tool's schema, a blocking tool call
runs on a daemon thread (a ``wait_for_result`` may take minutes and must neither stall the
stdout reader nor hold the wrapper's exit), at most ``MAX_CALLS`` at once — more are answered
with a tool error at once, never queued without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from wrapper.mcp_tools import SERVER_NAME, GatewayTools, handle

logger = logging.getLogger("wrapper.mcp")

MAX_CALLS = 16
"""Tool calls running at once; one more is refused with a tool error."""

Write = Callable[[bytes], Awaitable[None]]


class SdkMcpHost:
    """Answers the CLI's ``mcp_message`` control requests for the ccgate server.

    ``start`` takes one control request (already parsed) and answers it on ``write`` — at once
    for the protocol's own methods, from a task for ``tools/call``; ``cancel`` withdraws one.
    ``close`` cancels what is in flight (their threads finish on their own; answers are
    dropped).
    """

    def __init__(self, tools: GatewayTools) -> None:
        self._tools = tools
        self._calls: dict[str, asyncio.Task[None]] = {}

    @property
    def in_flight(self) -> int:
        """Tool calls not answered yet."""
        return len(self._calls)

    async def start(self, request_id: str, request: dict[str, Any], write: Write) -> None:
        """Handle one ``mcp_message`` control request (``request`` is its ``request`` object)."""
        server = request.get("server_name")
        message = request.get("message")
        if server != SERVER_NAME:
            await _answer_error(write, request_id, f"no SDK MCP server named {server!r}")
            return
        if isinstance(message, dict) and message.get("method") == "tools/call":
            rpc_id = message.get("id")
            params = message.get("params") if isinstance(message.get("params"), dict) else {}
            assert isinstance(params, dict)
            if len(self._calls) >= MAX_CALLS or request_id in self._calls:
                refusal = {
                    "content": [{"type": "text", "text": "too many ccgate tool calls at once"}],
                    "isError": True,
                }
                await _answer(write, request_id, _rpc_result(rpc_id, refusal))
                return
            task = asyncio.create_task(
                self._call(request_id, rpc_id, params, write), name=f"mcp-{request_id}"
            )
            self._calls[request_id] = task
            task.add_done_callback(lambda _t: self._calls.pop(request_id, None))
            return
        response = handle(message)
        await _answer(write, request_id, response or {"jsonrpc": "2.0", "result": {}})

    def cancel(self, request_id: str) -> None:
        """The CLI withdrew ``request_id``: stop waiting for it and never answer it."""
        task = self._calls.pop(request_id, None)
        if task is not None:
            task.cancel()

    def close(self) -> None:
        """Cancel every call in flight (the CLI is gone or the wrapper stops)."""
        for task in list(self._calls.values()):
            task.cancel()
        self._calls.clear()

    async def _call(
        self, request_id: str, rpc_id: Any, params: dict[str, Any], write: Write
    ) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[dict[str, Any]] = loop.create_future()
        name, arguments = str(params.get("name")), params.get("arguments")

        def run() -> None:
            try:
                result = self._tools.call_tool(name, arguments)
            except Exception as exc:  # a bug in a tool must still answer the CLI
                logger.exception("ccgate tool %s failed", name)
                result = {"content": [{"type": "text", "text": f"internal error: {exc}"}],
                          "isError": True}  # fmt: skip
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(_settle, done, result)

        threading.Thread(target=run, name=f"tool-{name}", daemon=True).start()
        result = await done
        await _answer(write, request_id, _rpc_result(rpc_id, result))


def _settle(future: asyncio.Future[dict[str, Any]], result: dict[str, Any]) -> None:
    if not future.done():
        future.set_result(result)


def _rpc_result(rpc_id: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "result": result}


async def _answer(write: Write, request_id: str, mcp_response: dict[str, Any]) -> None:
    line = {
        "type": "control_response",
        "response": {
            "subtype": "success",
            "request_id": request_id,
            "response": {"mcp_response": mcp_response},
        },
    }
    with contextlib.suppress(ConnectionError):  # the CLI is gone; its restart asks again
        await write((json.dumps(line, separators=(",", ":")) + "\n").encode())


async def _answer_error(write: Write, request_id: str, error: str) -> None:
    line = {
        "type": "control_response",
        "response": {"subtype": "error", "request_id": request_id, "error": error},
    }
    with contextlib.suppress(ConnectionError):
        await write((json.dumps(line, separators=(",", ":")) + "\n").encode())
