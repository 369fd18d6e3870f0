"""One long-lived Claude Code CLI process in stream-json mode: stdin, stdout, stderr, exit, stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import subprocess
import threading
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from wrapper.launch import popen_cli
from wrapper.ndjson import LineSplitter

logger = logging.getLogger(__name__)

_READ_CHUNK = 1 << 16
_STDERR_TAIL_LINES = 40


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
    """A running ``claude`` child process with piped stdio, driven from asyncio.

    stdout is read in chunks and split into lines with no length cap; stderr is drained all the
    time (so the CLI never blocks on a full pipe) and its last lines are kept for diagnostics.
    The process is a ``subprocess.Popen`` (so it can be started before asyncio is imported,
    see ``wrapper.launch``) whose pipes are connected to the loop; its exit is awaited by a
    daemon thread, which never holds up the wrapper's own exit.
    """

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        stdin: asyncio.StreamWriter,
        stdout: asyncio.StreamReader,
        stderr: asyncio.StreamReader,
        exited: asyncio.Future[int],
    ) -> None:
        self._popen = popen
        self._stdin = stdin
        self._stdout = stdout
        self._stderr = stderr
        self._exited = exited
        self.stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
        self._stderr_task = asyncio.create_task(self._drain_stderr(), name="cli-stderr")
        self._write_lock = asyncio.Lock()

    @classmethod
    async def spawn(
        cls, args: list[str], *, cwd: str, uid: int | None = None, home: str = "/home/claude"
    ) -> CliProcess:
        """Start the CLI (``wrapper.launch.popen_cli``) and adopt it; raises OSError when the
        binary cannot be executed or the user cannot be switched to."""
        return await cls.adopt(popen_cli(args, cwd=cwd, uid=uid, home=home))

    @classmethod
    async def adopt(cls, popen: subprocess.Popen[bytes]) -> CliProcess:
        """Drive an already started CLI (its three pipes) from the running loop."""
        assert popen.stdin is not None and popen.stdout is not None and popen.stderr is not None
        loop = asyncio.get_running_loop()
        stdout = asyncio.StreamReader(limit=_READ_CHUNK, loop=loop)
        stderr = asyncio.StreamReader(limit=_READ_CHUNK, loop=loop)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdout), popen.stdout)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stderr), popen.stderr)
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, popen.stdin
        )
        stdin = asyncio.StreamWriter(transport, protocol, None, loop)
        exited: asyncio.Future[int] = loop.create_future()

        def wait() -> None:
            code = popen.wait()
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, exited, code)

        threading.Thread(target=wait, name=f"cli-{popen.pid}-wait", daemon=True).start()
        logger.info("claude started, pid %s", popen.pid)
        return cls(popen, stdin, stdout, stderr, exited)

    @property
    def pid(self) -> int:
        """The CLI's process id."""
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once it has exited (negative: killed by that signal), else None."""
        return self._exited.result() if self._exited.done() else None

    async def write(self, line: bytes) -> None:
        """Write one NDJSON line to stdin; raises ConnectionError when stdin is closed."""
        stdin = self._stdin
        if stdin.is_closing():
            raise ConnectionError("claude stdin is closed")
        async with self._write_lock:
            try:
                stdin.write(line)
                await stdin.drain()
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ConnectionError("claude stdin is closed") from exc

    async def lines(self) -> AsyncIterator[bytes]:
        """Yield stdout lines until EOF."""
        stdout = self._stdout
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
        code = await asyncio.shield(self._exited)
        await asyncio.gather(self._stderr_task, return_exceptions=True)
        return code

    async def stop(self, grace_s: float) -> int:
        """Close stdin (EOF lets the CLI flush its transcript), then SIGTERM, then SIGKILL."""
        if not self._stdin.is_closing():
            self._stdin.close()
        for action in (None, self._popen.terminate, self._popen.kill):
            if action is not None and self.returncode is None:
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
        stderr = self._stderr
        splitter = LineSplitter()
        while True:
            chunk = await stderr.read(_READ_CHUNK)
            if not chunk:
                break
            for line in splitter.feed(chunk):
                text = line[:2000].decode(errors="replace")
                self.stderr_tail.append(text)
                logger.info("claude stderr: %s", text)


def _settle(future: asyncio.Future[int], code: int) -> None:
    if not future.done():
        future.set_result(code)
