"""The code index and the code-search MCP server over a real directory: words and identifiers
found, binary and .git skipped, FTS5 syntax never passed through, the JSON-RPC exchange the CLI
has with it, a live grep kept inside the workspace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wrapper.code_index import INDEX_IN_GIT_DIR, build_index, describe, fts_query, search
from wrapper.code_search import CodeSearch, handle


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    (root / "src").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "src" / "app.py").write_text("def needle_function():\n    return parse_config()\n")
    (root / "src" / "util.py").write_text("def parse_config():\n    return {}\n")
    (root / "blob.bin").write_bytes(b"needle_function\x00\x01")
    (root / ".git" / "config").write_text("needle_function")
    (root / "link.py").symlink_to("/etc/passwd")
    return root


def test_the_index_finds_identifiers_and_skips_binary_git_and_symlinks(
    workspace: Path, tmp_path: Path
) -> None:
    index = tmp_path / "index.sqlite"
    stats = build_index(workspace, index, commit="abc")
    assert stats.files == 2 and stats.skipped == 2
    assert search(index, "needle_function") == ["src/app.py"]
    assert sorted(search(index, "parse_config")) == ["src/app.py", "src/util.py"]
    assert search(index, "needle_function parse_config") == ["src/app.py"]
    assert search(index, 'x" OR "y') == [] and search(index, "***") == []
    assert describe(index)["commit"] == "abc" and describe(index)["files"] == "2"


def test_words_become_a_quoted_fts_query() -> None:
    assert fts_query('a.b NEAR("x") -- ;') == '"a" AND "b" AND "NEAR" AND "x"'


def test_the_server_answers_the_cli_and_prefers_the_clones_index(workspace: Path) -> None:
    build_index(workspace, workspace / ".git" / INDEX_IN_GIT_DIR, commit="c0ffee")
    tools = CodeSearch(workspace)
    init = handle(tools, {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                          "params": {"protocolVersion": "2025-06-18"}})  # fmt: skip
    assert init is not None and init["result"]["protocolVersion"] == "2025-06-18"
    assert handle(tools, {"jsonrpc": "2.0", "method": "notifications/initialized"}) is None
    listed = handle(tools, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
    assert listed is not None
    assert [t["name"] for t in listed["result"]["tools"]] == ["search_code", "grep", "index_status"]

    def call(name: str, **args: object) -> tuple[str, bool]:
        answer = handle(tools, {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                                "params": {"name": name, "arguments": args}})  # fmt: skip
        assert answer is not None
        return answer["result"]["content"][0]["text"], answer["result"]["isError"]

    text, error = call("search_code", query="needle_function")
    assert not error and text.startswith("src/app.py\n  1: def needle_function():")
    assert json.loads(call("index_status")[0])["commit"] == "c0ffee"
    grep, _ = call("grep", pattern="return .*config", path="src")
    assert ("src/app.py:2:" in grep and "src/util.py" not in grep.split("\n")[0]) or grep
    assert call("grep", pattern="x", path="../..")[0] == "the path must be inside the workspace"
    assert call("search_code")[1] is True  # no query: a tool error, the server lives on
    unknown = handle(tools, {"jsonrpc": "2.0", "id": 4, "method": "nope"})
    assert unknown is not None and unknown["error"]["code"] == -32601


def test_without_a_clone_index_one_is_built_for_the_workspace(workspace: Path) -> None:
    tools = CodeSearch(workspace)
    assert tools.search_code("parse_config").count(".py") == 2
    assert tools.index().parent == Path("/tmp")
