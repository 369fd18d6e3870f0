"""The ccgate MCP server: tools that let the Claude in this container spawn and direct children.

The Claude Code CLI runs it over stdio (the wrapper adds it to ``--mcp-config`` as server
``ccgate``, so the CLI sees ``mcp__ccgate__spawn_session`` and friends). Every tool calls the
gateway's HTTP API with this session's own JWT, read from ``CCGATE_TOKEN_FILE`` at each call (the
wrapper keeps the file fresh); that token reaches only this session's subtree. A refusal from the
gateway (a spawn limit, an unknown session) becomes a tool error carrying the gateway's message.

Environment: ``CCGATE_GATEWAY_URL``, ``CCGATE_SESSION_ID``, ``CCGATE_TOKEN_FILE``.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

GATEWAY_URL = os.environ.get("CCGATE_GATEWAY_URL", "").rstrip("/")
SESSION_ID = os.environ.get("CCGATE_SESSION_ID", "")
TOKEN_FILE = os.environ.get("CCGATE_TOKEN_FILE", "")

server = MCPServer(
    "ccgate",
    instructions=(
        "Spawn child Claude Code sessions, each in its own container, and direct them: "
        "spawn_session starts one with a prompt, wait_for_result returns its answer, "
        "send_message continues it, stop_session ends it. Limits on depth, children, tree "
        "size and cost apply; a refusal says which."
    ),
)


def _call(method: str, path: str, body: dict[str, Any] | None, timeout_s: float) -> Any:
    """One JSON request to the gateway (blocking; run in a thread). Raises ToolError."""
    try:
        with open(TOKEN_FILE) as fh:
            token = fh.read().strip()
    except OSError as exc:
        raise ToolError(f"no ccgate session token yet ({exc}); try again shortly") from exc
    request = urllib.request.Request(
        GATEWAY_URL + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail")
        except (ValueError, AttributeError):
            detail = None
        raise ToolError(f"{detail or exc.reason} (HTTP {exc.code})") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ToolError(f"the ccgate gateway is unreachable: {exc}") from exc
    return json.loads(raw) if raw else {}


async def _api(
    method: str, path: str, body: dict[str, Any] | None = None, timeout_s: float = 60
) -> Any:
    return await asyncio.to_thread(_call, method, f"/api/v1{path}", body, timeout_s)


def _summary(session: dict[str, Any]) -> dict[str, Any]:
    keys = ("session_id", "status", "parent_session_id", "child_session_ids", "total_turns",
            "total_cost_usd", "error")  # fmt: skip
    return {k: session.get(k) for k in keys}


@server.tool(structured_output=False)
async def spawn_session(
    prompt: str, workspace: str = "ephemeral", config: dict[str, Any] | None = None
) -> str:
    """Start a child Claude Code session in its own container; it runs ``prompt`` once.

    workspace: "ephemeral" (empty), "inherit" (share this session's /workspace) or "clone" (a
    copy of this session's /workspace as it is now). config: optional overrides such as model,
    system_prompt, allowed_tools, max_turns; whatever is not given is inherited.
    Returns JSON {child_session_id, status, parent_session_id}.
    """
    body = {"prompt": prompt, "workspace": {"type": workspace}, "config": config or {}}
    return json.dumps(await _api("POST", f"/sessions/{SESSION_ID}/spawn", body))


@server.tool(structured_output=False)
async def send_message(session_id: str, prompt: str) -> str:
    """Send another prompt to a descendant session; returns JSON {message_id, status}."""
    body = {"prompt": prompt, "stream": True}
    return json.dumps(await _api("POST", f"/sessions/{session_id}/chat", body))


@server.tool(structured_output=False)
async def wait_for_result(session_id: str, timeout_seconds: float = 600) -> str:
    """Wait for a descendant's latest turn to finish; returns JSON with its ``result`` text,
    status, is_error and cost."""
    body = {"timeout_seconds": timeout_seconds}
    result = await _api(
        "POST", f"/sessions/{session_id}/wait", body, timeout_s=timeout_seconds + 60
    )
    return json.dumps({"session_id": session_id, **result})


@server.tool(structured_output=False)
async def get_session(session_id: str) -> str:
    """Status, turns, cost and children of a descendant session (JSON)."""
    return json.dumps(_summary(await _api("GET", f"/sessions/{session_id}")))


@server.tool(structured_output=False)
async def list_children() -> str:
    """This session's children (JSON list of their status, turns and cost)."""
    children = await _api("GET", f"/sessions/{SESSION_ID}/children")
    return json.dumps([_summary(c) for c in children["children"]])


@server.tool(structured_output=False)
async def stop_session(session_id: str) -> str:
    """Stop a descendant session and its own subtree; returns its final status (JSON)."""
    return json.dumps(_summary(await _api("POST", f"/sessions/{session_id}/stop")))


def main() -> None:
    """Serve over stdio (the CLI starts this process)."""
    server.run("stdio")


if __name__ == "__main__":
    main()
