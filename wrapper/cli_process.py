"""One long-lived Claude Code CLI process in stream-json mode: argv, stdin, stdout, stderr, stop."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from wrapper.ndjson import LineSplitter
from wrapper.protocol import SessionSpec

logger = logging.getLogger(__name__)

_READ_CHUNK = 1 << 16
_STDERR_TAIL_LINES = 40


def build_cli_args(
    spec: SessionSpec,
    *,
    claude_bin: str,
    resume: bool,
    extra_mcp_servers: dict[str, Any] | None = None,
) -> list[str]:
    """The CLI command line for a session (flags from ``claude --help`` 2.1.x).

    ``resume=False`` pins the CLI's own session id (``spec.cli_session_id``, by default the
    ccgate session id) with ``--session-id``; ``resume=True`` continues that transcript with
    ``--resume``. Values use the ``--flag=value`` form so a value starting with ``-`` is never
    read as a flag.
    ``extra_mcp_servers`` (the ccgate tools) are added to the session's own MCP servers.
    """
    cli_id = spec.cli_session_id or spec.session_id
    args = [
        claude_bin,
        "--input-format=stream-json",
        "--output-format=stream-json",
        "--verbose",
        f"--resume={cli_id}" if resume else f"--session-id={cli_id}",
    ]
    if spec.model:
        args.append(f"--model={spec.model}")
    if spec.permission_mode:
        args.append(f"--permission-mode={spec.permission_mode}")
    if spec.allowed_tools:
        args.append(f"--allowedTools={','.join(spec.allowed_tools)}")
    if spec.disallowed_tools:
        args.append(f"--disallowedTools={','.join(spec.disallowed_tools)}")
    if spec.max_turns is not None:
        args.append(f"--max-turns={spec.max_turns}")
    if spec.max_budget_usd is not None:
        args.append(f"--max-budget-usd={spec.max_budget_usd}")
    if spec.system_prompt is not None:
        args.append(f"--system-prompt={spec.system_prompt}")
    if spec.append_system_prompt:
        args.append(f"--append-system-prompt={spec.append_system_prompt}")
    mcp_servers = {**spec.mcp_servers, **(extra_mcp_servers or {})}
    if mcp_servers:
        args.append(f"--mcp-config={json.dumps({'mcpServers': mcp_servers})}")
    if spec.include_partial_messages:
        args.append("--include-partial-messages")
    return args


def user_message_line(prompt: str) -> bytes:
    """A stream-json user message for the CLI's stdin (format: claude-agent-sdk, SDKUserMessage)."""
    msg = {
        "type": "user",
        "message": {"role": "user", "content": prompt},
        "parent_tool_use_id": None,
        "session_id": "",
    }
    return (json.dumps(msg) + "\n").encode()


def control_request_line(subtype: str, **fields: Any) -> tuple[str, bytes]:
    """A control-protocol request line; returns (request_id, line)."""
    request_id = f"req_{secrets.token_hex(6)}"
    msg = {
        "type": "control_request",
        "request_id": request_id,
        "request": {"subtype": subtype, **fields},
    }
    return request_id, (json.dumps(msg) + "\n").encode()


class CliProcess:
    """A running ``claude`` child process with piped stdio.

    stdout is read in chunks and split into lines with no length cap; stderr is drained all the
    time (so the CLI never blocks on a full pipe) and its last lines are kept for diagnostics.
    """

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self.stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
        self._stderr_task = asyncio.create_task(self._drain_stderr(), name="cli-stderr")
        self._write_lock = asyncio.Lock()

    @classmethod
    async def spawn(
        cls, args: list[str], *, cwd: str, env: dict[str, str], uid: int | None = None
    ) -> CliProcess:
        """Start the CLI (as ``uid`` and its group, with no supplementary groups, when given:
        the kernel then clears every capability the wrapper holds); raises OSError when the
        binary cannot be executed or the user cannot be switched to."""
        as_user: dict[str, object] = {}
        if uid is not None:
            as_user = {"user": uid, "group": uid, "extra_groups": []}
        proc = await asyncio.create_subprocess_exec(
            *args,
            cwd=cwd,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            **as_user,  # type: ignore[arg-type]
        )
        logger.info("claude started, pid %s", proc.pid)
        return cls(proc)

    @property
    def pid(self) -> int:
        """The CLI's process id."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once it has exited, else None."""
        return self._proc.returncode

    async def write(self, line: bytes) -> None:
        """Write one NDJSON line to stdin; raises ConnectionError when stdin is closed."""
        stdin = self._proc.stdin
        if stdin is None or stdin.is_closing():
            raise ConnectionError("claude stdin is closed")
        async with self._write_lock:
            stdin.write(line)
            await stdin.drain()

    async def lines(self) -> AsyncIterator[bytes]:
        """Yield stdout lines until EOF."""
        stdout = self._proc.stdout
        assert stdout is not None
        splitter = LineSplitter()
        while True:
            chunk = await stdout.read(_READ_CHUNK)
            if not chunk:
                break
            for line in splitter.feed(chunk):
                yield line
        rest = splitter.flush()
        if rest is not None:
            yield rest

    async def wait(self) -> int:
        """Wait for exit; returns the exit status."""
        code = await self._proc.wait()
        await asyncio.gather(self._stderr_task, return_exceptions=True)
        return code

    async def stop(self, grace_s: float) -> int:
        """Close stdin (EOF lets the CLI flush its transcript), then SIGTERM, then SIGKILL."""
        stdin = self._proc.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()
        for action in (None, self._proc.terminate, self._proc.kill):
            if action is not None and self._proc.returncode is None:
                try:
                    action()
                except ProcessLookupError:
                    pass
            try:
                return await asyncio.wait_for(self.wait(), grace_s)
            except TimeoutError:
                continue
        return await self.wait()

    async def _drain_stderr(self) -> None:
        stderr = self._proc.stderr
        assert stderr is not None
        splitter = LineSplitter()
        while True:
            chunk = await stderr.read(_READ_CHUNK)
            if not chunk:
                break
            for line in splitter.feed(chunk):
                text = line[:2000].decode(errors="replace")
                self.stderr_tail.append(text)
                logger.info("claude stderr: %s", text)


def cli_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The CLI's environment: ours minus wrapper-only variables and CLAUDECODE.

    ``CLAUDECODE`` makes 2.1.39+ refuse to start ("cannot be launched inside another Claude Code
    session"); ``CCGATE_REDIS_URL`` holds the session's Redis credentials, which the agent's
    Bash tool must not see.
    """
    env = dict(os.environ if base is None else base)
    for name in ("CLAUDECODE", "CCGATE_REDIS_URL"):
        env.pop(name, None)
    return env
