"""The ccgate MCP server: tools that let the Claude in this container spawn and direct children.

It runs inside the wrapper as an *SDK MCP server*: the wrapper names it in ``--mcp-config`` as
``{"type": "sdk", "name": "ccgate"}`` and the CLI sends it JSON-RPC through the control protocol
(``mcp_message`` requests, answered by ``wrapper/sdk_mcp.py``), the way claude-agent-sdk serves
in-process tools. So no process starts for it (a Python MCP server over stdio cost 60-110 ms of
every cold start), and the session token it calls the gateway with stays in the wrapper's memory,
out of the agent's reach. The CLI shows the tools as ``mcp__ccgate__spawn_session`` and friends.

Every tool calls the gateway's HTTP API with this session's JWT (the wrapper keeps it fresh);
that token reaches only this session's subtree. A refusal from the gateway (a spawn limit, an
unknown session) becomes a tool error carrying the gateway's message. Wire format (MCP spec,
"Lifecycle" and "Tools"): JSON-RPC 2.0; ``initialize`` → ``notifications/initialized`` →
``tools/list`` / ``tools/call`` / ``ping``. ``handle`` answers everything but ``tools/call``,
which blocks on HTTP and is run by the caller off its event loop (``GatewayTools.call_tool``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

SERVER_NAME = "ccgate"
SDK_SERVER_CONFIG: dict[str, Any] = {"type": "sdk", "name": SERVER_NAME}
"""The ``--mcp-config`` entry of the ccgate tools (answered by ``wrapper/sdk_mcp.py``)."""
PROTOCOL_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
"""Versions this server speaks, newest first; it answers the client's if listed, else the
newest."""
SERVER_INFO = {"name": "ccgate", "version": "1"}
INSTRUCTIONS = (
    "Spawn child Claude Code sessions, each in its own container, and direct them: "
    "spawn_session starts one with a prompt, wait_for_result returns its answer, "
    "send_message continues it, stop_session ends it. Limits on depth, children, tree "
    "size and cost apply; a refusal says which."
)


class ToolError(Exception):
    """A tool failed in a way the model should read (becomes ``isError: true``)."""


class GatewayTools:
    """The tools' implementations: blocking JSON calls to the gateway's ``/api/v1``.

    ``gateway_url`` is the gateway's root as the container reaches it; ``token`` and
    ``session_id`` are read at each call (the wrapper renews the token; a warm-pool container
    has no session until its claim, and then both return None). Every method returns the
    tool's text (JSON) or raises ToolError with what the model should read.
    """

    def __init__(
        self,
        gateway_url: str,
        *,
        token: Callable[[], str | None],
        session_id: Callable[[], str | None],
    ) -> None:
        self._gateway_url = gateway_url.rstrip("/")
        self._token = token
        self._session_id = session_id

    def _own_id(self) -> str:
        value = self._session_id()
        if not value:
            raise ToolError("this container has no ccgate session yet; try again shortly")
        return value

    def _call(self, method: str, path: str, body: dict[str, Any] | None, timeout_s: float) -> Any:
        """One JSON request (blocking, at most ``timeout_s`` seconds). Raises ToolError."""
        import urllib.error  # imported on first use: most sessions never call a tool
        import urllib.request

        token = self._token()
        if not token:
            raise ToolError("no ccgate session token yet; try again shortly")
        request = urllib.request.Request(
            f"{self._gateway_url}/api/v1{path}",
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

    def spawn_session(
        self, prompt: str, workspace: str = "ephemeral", config: dict[str, Any] | None = None
    ) -> str:
        """Start a child Claude Code session in its own container; it runs ``prompt`` once."""
        body = {"prompt": prompt, "workspace": {"type": workspace}, "config": config or {}}
        return json.dumps(self._call("POST", f"/sessions/{self._own_id()}/spawn", body, 60))

    def send_message(self, session_id: str, prompt: str) -> str:
        """Send another prompt to a descendant session."""
        body = {"prompt": prompt, "stream": True}
        return json.dumps(self._call("POST", f"/sessions/{session_id}/chat", body, 60))

    def wait_for_result(self, session_id: str, timeout_seconds: float = 600) -> str:
        """Wait for a descendant's latest turn to finish."""
        body = {"timeout_seconds": timeout_seconds}
        result = self._call("POST", f"/sessions/{session_id}/wait", body, timeout_seconds + 60)
        return json.dumps({"session_id": session_id, **result})

    def get_session(self, session_id: str) -> str:
        """Status, turns, cost and children of a descendant session."""
        return json.dumps(_summary(self._call("GET", f"/sessions/{session_id}", None, 60)))

    def list_children(self) -> str:
        """This session's children."""
        children = self._call("GET", f"/sessions/{self._own_id()}/children", None, 60)
        return json.dumps([_summary(c) for c in children["children"]])

    def stop_session(self, session_id: str) -> str:
        """Stop a descendant session and its own subtree."""
        return json.dumps(_summary(self._call("POST", f"/sessions/{session_id}/stop", None, 60)))

    def call_tool(self, name: str, arguments: Any) -> dict[str, Any]:
        """Run a tool (blocking); the MCP ``CallToolResult`` (text content, ``isError`` on
        failure: unknown tool, arguments that do not fit its schema, a gateway refusal)."""
        try:
            if name not in TOOLS:
                raise ToolError(f"unknown tool {name!r}")
            _, schema = TOOLS[name]
            args = _check_arguments(schema, arguments if arguments is not None else {})
            text: str = getattr(self, name)(**args)
            return {"content": [{"type": "text", "text": text}], "isError": False}
        except ToolError as exc:
            return {"content": [{"type": "text", "text": str(exc)}], "isError": True}


def _summary(session: dict[str, Any]) -> dict[str, Any]:
    keys = ("session_id", "status", "parent_session_id", "child_session_ids", "total_turns",
            "total_cost_usd", "error")  # fmt: skip
    return {k: session.get(k) for k in keys}


def _schema(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required}


_ID = {"type": "string", "description": "a descendant session's id"}
TOOLS: dict[str, tuple[str, dict[str, Any]]] = {
    # name: (description, input schema); the implementation is the GatewayTools method of the name
    "spawn_session": (
        "Start a child Claude Code session in its own container; it runs `prompt` once.\n\n"
        'workspace: "ephemeral" (empty), "inherit" (share this session\'s /workspace) or '
        '"clone" (a copy of this session\'s /workspace as it is now). config: optional '
        "overrides such as model, system_prompt, allowed_tools, max_turns; whatever is not "
        "given is inherited.\nReturns JSON {child_session_id, status, parent_session_id}.",
        _schema(
            {
                "prompt": {"type": "string"},
                "workspace": {
                    "type": "string",
                    "enum": ["ephemeral", "inherit", "clone"],
                    "default": "ephemeral",
                },
                "config": {"anyOf": [{"type": "object"}, {"type": "null"}], "default": None},
            },
            ["prompt"],
        ),
    ),
    "send_message": (
        "Send another prompt to a descendant session; returns JSON {message_id, status}.",
        _schema({"session_id": _ID, "prompt": {"type": "string"}}, ["session_id", "prompt"]),
    ),
    "wait_for_result": (
        "Wait for a descendant's latest turn to finish; returns JSON with its `result` text, "
        "status, is_error and cost.",
        _schema(
            {"session_id": _ID, "timeout_seconds": {"type": "number", "default": 600}},
            ["session_id"],
        ),
    ),
    "get_session": (
        "Status, turns, cost and children of a descendant session (JSON).",
        _schema({"session_id": _ID}, ["session_id"]),
    ),
    "list_children": (
        "This session's children (JSON list of their status, turns and cost).",
        _schema({}, []),
    ),
    "stop_session": (
        "Stop a descendant session and its own subtree; returns its final status (JSON).",
        _schema({"session_id": _ID}, ["session_id"]),
    ),
}


def _check_arguments(schema: dict[str, Any], arguments: Any) -> dict[str, Any]:
    """The arguments if they fit the tool's schema (object, required present, no unknown
    names, JSON types); raises ToolError saying what to fix."""
    if not isinstance(arguments, dict):
        raise ToolError("arguments must be a JSON object")
    properties: dict[str, Any] = schema["properties"]
    unknown = sorted(set(arguments) - set(properties))
    if unknown:
        raise ToolError(f"unknown argument(s): {', '.join(unknown)}")
    missing = [name for name in schema["required"] if name not in arguments]
    if missing:
        raise ToolError(f"missing required argument(s): {', '.join(missing)}")
    kinds: dict[str, type | tuple[type, ...]] = {
        "string": str,
        "number": (int, float),
        "object": dict,
    }
    for name, value in arguments.items():
        kind = properties[name].get("type")
        expected = kinds.get(kind)
        if expected is not None and (isinstance(value, bool) or not isinstance(value, expected)):
            raise ToolError(f"argument {name} must be a {kind}")
        allowed = properties[name].get("enum")
        if allowed and value not in allowed:
            raise ToolError(f"argument {name} must be one of {', '.join(allowed)}")
    return arguments


def handle(message: Any) -> dict[str, Any] | None:
    """The JSON-RPC response to one request (None for a notification or a response).
    ``tools/call`` is not handled here: it blocks, so the host runs ``GatewayTools.call_tool``
    off its loop."""
    if not isinstance(message, dict):
        return _error(None, -32600, "invalid request: a JSON-RPC 2.0 object is expected")
    if message.get("jsonrpc") != "2.0":
        return _error(message.get("id"), -32600, 'invalid request: "jsonrpc" must be "2.0"')
    if "method" not in message:
        return None  # a response to something we never ask
    method, request_id = message["method"], message.get("id")
    if request_id is None:
        return None  # notifications/initialized, notifications/cancelled, ...
    params = message.get("params") or {}
    if method == "initialize":
        asked = params.get("protocolVersion") if isinstance(params, dict) else None
        version = asked if asked in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[0]
        return _result(
            request_id,
            {
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": SERVER_INFO,
                "instructions": INSTRUCTIONS,
            },
        )
    if method == "ping":
        return _result(request_id, {})
    if method == "tools/list":
        tools = [
            {"name": name, "description": description, "inputSchema": schema}
            for name, (description, schema) in TOOLS.items()
        ]
        return _result(request_id, {"tools": tools})
    return _error(request_id, -32601, f"method not found: {method}")


def _result(request_id: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def _error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
