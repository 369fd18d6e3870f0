"""The ccgate tools as an SDK MCP server: JSON-RPC lifecycle and tool listing, argument checks,
control-protocol framing (answers, acknowledgements, cancellation, the in-flight bound), and tool
calls against a real local HTTP server standing in for the gateway."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from wrapper import mcp_tools, sdk_mcp
from wrapper.mcp_tools import GatewayTools
from wrapper.sdk_mcp import SdkMcpHost


class Cli:
    """Collects what the host writes to the CLI's stdin."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.wrote = asyncio.Event()

    async def write(self, line: bytes) -> None:
        assert line.endswith(b"\n")
        self.lines.append(json.loads(line))
        self.wrote.set()

    def answers(self) -> dict[str, Any]:
        """{control request id: mcp_response}."""
        return {
            x["response"]["request_id"]: x["response"]["response"]["mcp_response"]
            for x in self.lines
            if x["response"]["subtype"] == "success"
        }


def _tools(url: str = "http://127.0.0.1:9", token: str | None = "tok-1") -> GatewayTools:
    return GatewayTools(url, token=lambda: token, session_id=lambda: "sess-9")


async def _serve(host: SdkMcpHost, messages: list[Any], *, settle: int = 0) -> Cli:
    """Send each message as one mcp_message control request (ids r0, r1, …); wait until
    ``settle`` more answers (tool calls) have arrived."""
    cli = Cli()
    for i, message in enumerate(messages):
        request = {"subtype": "mcp_message", "server_name": "ccgate", "message": message}
        await host.start(f"r{i}", request, cli.write)
    immediate = len(cli.lines)
    async with asyncio.timeout(10):
        while len(cli.lines) < immediate + settle:
            cli.wrote.clear()
            await cli.wrote.wait()
    return cli


def _run(lines: list[Any], tools: GatewayTools | None = None) -> list[dict[str, Any]]:
    """JSON-RPC answers, in request order, of the messages (tool calls awaited)."""
    calls = sum(1 for m in lines if isinstance(m, dict) and m.get("method") == "tools/call")
    cli = asyncio.run(_serve(SdkMcpHost(tools or _tools()), lines, settle=calls))
    answers = cli.answers()
    return [answers[f"r{i}"] for i in range(len(lines))]


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
    # The notification is acknowledged (the control request carrying it expects an answer).
    assert replies[1] == {"jsonrpc": "2.0", "result": {}}
    by_id = {r["id"]: r for r in replies if "id" in r}
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
            "not an object",
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
    assert by_id[None]["error"]["code"] == -32600
    assert by_id[7]["error"]["code"] == -32601
    assert by_id[8]["error"]["code"] == -32600
    texts = {i: by_id[i]["result"]["content"][0]["text"] for i in (9, 10, 11, 12)}
    assert all(by_id[i]["result"]["isError"] for i in (9, 10, 11, 12))
    assert "missing required argument(s): session_id" in texts[9]
    assert "unknown tool 'nope'" in texts[10]
    assert "timeout_seconds must be a number" in texts[11]
    assert "workspace must be one of ephemeral, inherit, clone" in texts[12]


@pytest.fixture
def gateway() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A local HTTP server answering spawns (409 when the prompt says "refuse") and waits
    (after 5 s); yields its URL and the requests it saw."""
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers["Authorization"], "body": body})
            if self.path.endswith("/wait"):
                threading.Event().wait(5)
                self._reply(200, {"status": "completed"})
            elif "refuse" in body.get("prompt", ""):
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
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()


def test_a_tool_call_reaches_the_gateway_with_the_session_token(
    gateway: tuple[str, list[dict[str, Any]]],
) -> None:
    url, seen = gateway
    replies = _run(
        [
            {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
             "params": {"name": "spawn_session", "arguments": {"prompt": "count files"}}},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
             "params": {"name": "spawn_session", "arguments": {"prompt": "refuse me"}}},
        ],
        _tools(url),
    )  # fmt: skip
    by_id = {r["id"]: r["result"] for r in replies}
    assert by_id[1]["isError"] is False
    assert json.loads(by_id[1]["content"][0]["text"])["child_session_id"] == "c-1"
    assert by_id[2]["isError"] is True
    assert by_id[2]["content"][0]["text"] == "max_children (2) reached (HTTP 409)"
    assert {s["path"] for s in seen} == {"/api/v1/sessions/sess-9/spawn"}
    assert {s["auth"] for s in seen} == {"Bearer tok-1"}
    assert seen[0]["body"]["workspace"] == {"type": "ephemeral"}


def test_without_a_token_or_a_gateway_a_tool_says_so() -> None:
    (no_token,) = _run(
        [{"jsonrpc": "2.0", "id": 1, "method": "tools/call",
          "params": {"name": "list_children", "arguments": {}}}],
        _tools(token=None),
    )  # fmt: skip
    assert no_token["result"]["isError"] is True
    assert "no ccgate session token yet" in no_token["result"]["content"][0]["text"]
    (unreachable,) = _run(
        [{"jsonrpc": "2.0", "id": 1, "method": "tools/call",
          "params": {"name": "list_children", "arguments": {}}}],
        _tools("http://127.0.0.1:9"),
    )  # fmt: skip
    assert "the ccgate gateway is unreachable" in unreachable["result"]["content"][0]["text"]


async def test_a_slow_call_never_blocks_the_others_and_a_cancelled_one_is_not_answered(
    gateway: tuple[str, list[dict[str, Any]]],
) -> None:
    url, _ = gateway
    host = SdkMcpHost(_tools(url))
    cli = Cli()
    wait = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "wait_for_result", "arguments": {"session_id": "c-1"}}}  # fmt: skip
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    for rid, message in (("slow", wait), ("gone", wait), ("ping", ping)):
        request = {"subtype": "mcp_message", "server_name": "ccgate", "message": message}
        await host.start(rid, request, cli.write)
    # The ping is answered while both waits are still in their HTTP call.
    assert list(cli.answers()) == ["ping"] and host.in_flight == 2
    host.cancel("gone")
    async with asyncio.timeout(10):
        while "slow" not in cli.answers():
            cli.wrote.clear()
            await cli.wrote.wait()
    await asyncio.sleep(0.2)
    assert set(cli.answers()) == {"ping", "slow"} and host.in_flight == 0
    assert cli.answers()["slow"]["result"]["isError"] is False


async def test_tool_calls_past_the_bound_are_refused_at_once(
    gateway: tuple[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = gateway
    monkeypatch.setattr(sdk_mcp, "MAX_CALLS", 2)
    host = SdkMcpHost(_tools(url))
    cli = Cli()
    wait = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "wait_for_result", "arguments": {"session_id": "c-1"}}}  # fmt: skip
    for rid in ("a", "b", "c"):
        request = {"subtype": "mcp_message", "server_name": "ccgate", "message": wait}
        await host.start(rid, request, cli.write)
    refused = cli.answers()["c"]["result"]
    assert refused["isError"] is True and "too many" in refused["content"][0]["text"]
    assert host.in_flight == 2
    host.close()
    assert host.in_flight == 0


async def test_another_server_name_is_an_error_answer() -> None:
    cli = Cli()
    request = {"subtype": "mcp_message", "server_name": "other", "message": {"id": 1}}
    await SdkMcpHost(_tools()).start("x", request, cli.write)
    assert cli.lines[0]["response"]["subtype"] == "error"
    assert "other" in cli.lines[0]["response"]["error"]
