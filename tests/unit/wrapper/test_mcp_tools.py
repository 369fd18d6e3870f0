"""The ccgate MCP server's stdio JSON-RPC: lifecycle, tool listing, argument checks, and a tool
call against a real local HTTP server standing in for the gateway."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from wrapper import mcp_tools


def _run(lines: list[dict[str, Any] | str]) -> list[dict[str, Any]]:
    stdin = io.StringIO("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    stdout = io.StringIO()
    mcp_tools.serve(stdin, stdout)
    return [json.loads(line) for line in stdout.getvalue().splitlines()]


def test_initialize_negotiates_the_version_and_lists_the_tools() -> None:
    replies = _run(
        [
            {"jsonrpc": "2.0", "id": 1, "method": "initialize",
             "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                        "clientInfo": {"name": "claude-code", "version": "2"}}},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
            {"jsonrpc": "2.0", "id": 3, "method": "ping"},
            {"jsonrpc": "2.0", "id": 4, "method": "initialize",
             "params": {"protocolVersion": "1999-01-01"}},
        ]
    )  # fmt: skip
    by_id = {r["id"]: r for r in replies}
    assert len(replies) == 4  # no answer to the notification
    init = by_id[1]["result"]
    assert init["protocolVersion"] == "2025-06-18"
    assert init["serverInfo"]["name"] == "ccgate"
    assert init["capabilities"] == {"tools": {"listChanged": False}}
    assert by_id[4]["result"]["protocolVersion"] == mcp_tools.PROTOCOL_VERSIONS[0]
    names = [t["name"] for t in by_id[2]["result"]["tools"]]
    assert names == ["spawn_session", "send_message", "wait_for_result", "get_session",
                     "list_children", "stop_session"]  # fmt: skip
    for tool in by_id[2]["result"]["tools"]:
        assert tool["inputSchema"]["type"] == "object" and tool["description"]
    assert by_id[3]["result"] == {}


def test_protocol_errors_are_answered_not_crashed_on() -> None:
    replies = _run(
        [
            "not json",
            {"jsonrpc": "2.0", "id": 7, "method": "resources/list"},
            {"id": 8, "method": "ping"},
            {"jsonrpc": "2.0", "id": 9, "method": "tools/call",
             "params": {"name": "get_session", "arguments": {}}},
            {"jsonrpc": "2.0", "id": 10, "method": "tools/call",
             "params": {"name": "nope", "arguments": {}}},
            {"jsonrpc": "2.0", "id": 11, "method": "tools/call",
             "params": {"name": "wait_for_result",
                        "arguments": {"session_id": "x", "timeout_seconds": "soon"}}},
            {"jsonrpc": "2.0", "id": 12, "method": "tools/call",
             "params": {"name": "spawn_session",
                        "arguments": {"prompt": "p", "workspace": "shared"}}},
        ]
    )  # fmt: skip
    by_id = {r["id"]: r for r in replies}
    assert by_id[None]["error"]["code"] == -32700
    assert by_id[7]["error"]["code"] == -32601
    assert by_id[8]["error"]["code"] == -32600
    texts = {i: by_id[i]["result"]["content"][0]["text"] for i in (9, 10, 11, 12)}
    assert all(by_id[i]["result"]["isError"] for i in (9, 10, 11, 12))
    assert "missing required argument(s): session_id" in texts[9]
    assert "unknown tool 'nope'" in texts[10]
    assert "timeout_seconds must be a number" in texts[11]
    assert "workspace must be one of ephemeral, inherit, clone" in texts[12]


@pytest.fixture
def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers["Authorization"], "body": body})
            if "refuse" in body.get("prompt", ""):
                self._reply(409, {"detail": "max_children (2) reached"})
            else:
                self._reply(201, {"child_session_id": "c-1", "status": "starting"})

        def _reply(self, code: int, obj: dict[str, Any]) -> None:
            raw = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "token").write_text("tok-1\n")
    (tmp_path / "session").write_text("sess-9")
    monkeypatch.setattr(mcp_tools, "GATEWAY_URL", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(mcp_tools, "TOKEN_FILE", str(tmp_path / "token"))
    monkeypatch.setattr(mcp_tools, "SESSION_FILE", str(tmp_path / "session"))
    yield seen
    server.shutdown()


def test_a_tool_call_reaches_the_gateway_with_the_session_token(
    gateway: list[dict[str, Any]],
) -> None:
    replies = _run(
        [
            {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
             "params": {"name": "spawn_session", "arguments": {"prompt": "count files"}}},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
             "params": {"name": "spawn_session", "arguments": {"prompt": "refuse me"}}},
        ]
    )  # fmt: skip
    by_id = {r["id"]: r["result"] for r in replies}
    assert by_id[1]["isError"] is False
    assert json.loads(by_id[1]["content"][0]["text"])["child_session_id"] == "c-1"
    assert by_id[2]["isError"] is True
    assert by_id[2]["content"][0]["text"] == "max_children (2) reached (HTTP 409)"
    assert {s["path"] for s in gateway} == {"/api/v1/sessions/sess-9/spawn"}
    assert {s["auth"] for s in gateway} == {"Bearer tok-1"}
    assert gateway[0]["body"]["workspace"] == {"type": "ephemeral"}
