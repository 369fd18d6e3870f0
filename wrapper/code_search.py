"""The code-search MCP server (stdio) of ccgate's built-in ``code-search`` profile: the agent's
index of its workspace (Claude Batch Server's cidx). Standard library only; started by the CLI
as ``python3 -m wrapper.code_search [ROOT]`` (ROOT default ``/workspace``).

Tools:
- ``search_code {query, limit?}`` — files containing every word of ``query`` (lexical, from the
  index), best first, each with its matching lines as the workspace has them now;
- ``grep {pattern, path?, limit?}`` — a live regular-expression search (ripgrep) of the
  workspace, for what changed since the index was built;
- ``index_status {}`` — what the index holds (commit, files, bytes, when built).

The index is the clone's (``.git/ccgate-index.sqlite``, built by the gateway once per commit and
shared by every job on it) or, when the workspace has none (a zip, a git URL, an empty
workspace), one built here at the first search, in ``/tmp``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from wrapper.code_index import INDEX_IN_GIT_DIR, build_index, describe, search

PROTOCOL = "2025-06-18"
MAX_LINES_PER_FILE = 5
GREP_TIMEOUT_S = 20.0

TOOLS: list[dict[str, Any]] = [
    {
        "name": "search_code",
        "description": "Find the files of the workspace that contain every word of the query "
        "(identifiers, names, words), best match first, with their matching lines.",
        "inputSchema": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "words or identifiers"},
                "limit": {"type": "integer", "minimum": 1, "maximum": 50, "default": 20},
            },
            "required": ["query"],
        },
    },
    {
        "name": "grep",
        "description": "Search the workspace's current files for a regular expression "
        "(ripgrep syntax); lines as path:line:text.",
        "inputSchema": {
            "type": "object",
            "properties": {
                "pattern": {"type": "string"},
                "path": {"type": "string", "description": "a file or directory (default all)"},
                "limit": {"type": "integer", "minimum": 1, "maximum": 500, "default": 100},
            },
            "required": ["pattern"],
        },
    },
    {
        "name": "index_status",
        "description": "What the code index holds: commit, files, bytes, when it was built.",
        "inputSchema": {"type": "object", "properties": {}},
    },
]


class CodeSearch:
    """The tools over one workspace."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._index: Path | None = None

    def index(self) -> Path:
        """The clone's index, or one built now over the workspace (once)."""
        if self._index is None:
            shipped = self.root / ".git" / INDEX_IN_GIT_DIR
            if shipped.is_file():
                self._index = shipped
            else:
                built = Path("/tmp") / "ccgate-code-index.sqlite"
                build_index(self.root, built)
                self._index = built
        return self._index

    def search_code(self, query: str, limit: int = 20) -> str:
        paths = search(self.index(), query, limit=max(1, min(limit, 50)))
        if not paths:
            return f"no file contains all of: {query}"
        words = [w.lower() for w in re.findall(r"[A-Za-z0-9_]+", query)]
        out: list[str] = []
        for rel in paths:
            out.append(rel)
            out.extend(self._lines(rel, words))
        return "\n".join(out)

    def _lines(self, rel: str, words: list[str]) -> list[str]:
        path = self.root / rel
        try:
            if path.is_symlink() or not path.is_file():
                return ["  (no longer in the workspace)"]
            text = path.read_text(errors="replace")
        except OSError:
            return []
        found: list[str] = []
        for number, line in enumerate(text.splitlines(), start=1):
            lowered = line.lower()
            if any(w in lowered for w in words):
                found.append(f"  {number}: {line.strip()[:200]}")
                if len(found) >= MAX_LINES_PER_FILE:
                    break
        return found

    def grep(self, pattern: str, path: str | None = None, limit: int = 100) -> str:
        where = "."
        if path:
            parts = [p for p in path.split("/") if p not in ("", ".")]
            if ".." in parts:
                return "the path must be inside the workspace"
            where = "/".join(parts) or "."
        try:
            done = subprocess.run(
                ["rg", "--no-heading", "-n", "--hidden", "--glob", "!.git", "--max-columns",
                 "300", "-e", pattern, "--", where],
                cwd=self.root, capture_output=True, text=True, timeout=GREP_TIMEOUT_S,
                check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return f"the search took longer than {GREP_TIMEOUT_S:.0f}s; narrow it with path"
        if done.returncode == 2:
            return f"grep failed: {done.stderr.strip()[:500]}"
        lines = done.stdout.splitlines()
        shown = lines[: max(1, min(limit, 500))]
        more = f"\n… {len(lines) - len(shown)} more lines" if len(lines) > len(shown) else ""
        return ("\n".join(shown) or "no match") + more

    def index_status(self) -> str:
        return json.dumps(describe(self.index()))

    def call(self, name: str, args: dict[str, Any]) -> tuple[str, bool]:
        """Run one tool; (text, is_error)."""
        try:
            if name == "search_code":
                return self.search_code(str(args["query"]), int(args.get("limit", 20))), False
            if name == "grep":
                path = args.get("path")
                limit = int(args.get("limit", 100))
                return self.grep(str(args["pattern"]), str(path) if path else None, limit), False
            if name == "index_status":
                return self.index_status(), False
            return f"unknown tool {name}", True
        except (KeyError, TypeError, ValueError) as exc:
            return f"bad arguments for {name}: {exc}", True
        except Exception as exc:
            return f"{name} failed: {exc}", True


def handle(tools: CodeSearch, message: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON-RPC answer to one message (None for notifications)."""
    if "id" not in message:
        return None
    method = message.get("method")
    params = message.get("params") or {}
    result: dict[str, Any]
    if method == "initialize":
        result = {
            "protocolVersion": params.get("protocolVersion", PROTOCOL),
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "ccgate-code-search", "version": "1"},
        }
    elif method == "tools/list":
        result = {"tools": TOOLS}
    elif method == "tools/call":
        text, is_error = tools.call(str(params.get("name")), dict(params.get("arguments") or {}))
        result = {"content": [{"type": "text", "text": text}], "isError": is_error}
    elif method == "ping":
        result = {}
    else:
        return {
            "jsonrpc": "2.0",
            "id": message["id"],
            "error": {"code": -32601, "message": f"method {method} not found"},
        }
    return {"jsonrpc": "2.0", "id": message["id"], "result": result}


def main() -> None:
    """Serve MCP over stdin/stdout, one JSON message per line."""
    tools = CodeSearch(Path(sys.argv[1] if len(sys.argv) > 1 else "/workspace"))
    for line in sys.stdin:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict):
            answer = handle(tools, message)
            if answer is not None:
                sys.stdout.write(json.dumps(answer) + "\n")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
