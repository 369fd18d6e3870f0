"""The CLI's life: launch with ``--session-id`` (or ``--resume``), the ``initialize`` handshake and
MCP readiness, restarts within a crash budget, stdout to events, control requests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from typing import Any

from wrapper.cli_process import CliProcess, control_request_line
from wrapper.launch import session_cli_args, transcript_cli_id
from wrapper.protocol import (
    EventSource,
    EventType,
)
from wrapper.runner_state import RunnerState, StartupFailed

logger = logging.getLogger("wrapper.runner")


class CliLife(RunnerState):
    """Launch, handshake, supervise and restart the CLI; read its stdout; control requests."""

    def _transcript(self) -> str | None:
        """The CLI session id of the transcript on the config volume, if there is one."""
        return transcript_cli_id(self._config.marker_dir, self._spec)

    def _transcript_exists(self) -> bool:
        return self._transcript() is not None

    @property
    def _cli_session_id(self) -> str:
        return self._spec.cli_session_id or self._spec.session_id

    def _mark_transcript(self) -> None:
        if self._transcript_exists():
            return
        os.makedirs(self._config.marker_dir, exist_ok=True)
        with open(self._state_file, "w") as fh:
            json.dump({"transcript": True, "cli_session_id": self._cli_session_id}, fh)

    @property
    def cli_alive(self) -> bool:
        """True while the launched CLI runs (its stdout pump has not ended)."""
        return self._pump is not None and not self._pump.done()

    async def stop_cli(self) -> None:
        """Stop a prestarted CLI that will never serve a session."""
        if self._cli is not None:
            await self._cli.stop(self._config.stop_grace_s)

    async def prestart(self) -> None:
        """Warm pool: launch the CLI and finish its handshake before any session exists;
        ``_supervise`` then adopts it. Raises StartupFailed."""
        self._prestarted = await self._launch(resume=False)

    async def _supervise(self) -> None:
        first = True
        last_exit: dict[str, Any] = {}
        while not self._stop.is_set():
            cli_id = self._transcript()
            resume = cli_id is not None
            if cli_id is not None and cli_id != self._cli_session_id:
                self._spec = dataclasses.replace(self._spec, cli_session_id=cli_id)
            try:
                if self._prestarted is not None:
                    info, self._prestarted = self._prestarted, None
                    info["cli_session_id"] = self._cli_session_id
                else:
                    info = await self._launch(resume=resume)
            except StartupFailed as exc:
                tail = list(self._cli.stderr_tail) if self._cli else []
                logger.error("claude did not start: %s", exc)
                if self._note_crash():
                    self._fatal("cli_start_failed", f"Claude Code CLI did not start: {exc}", tail)
                    return
                await asyncio.sleep(1.0)
                continue
            if first:
                if self._spec.resumed_at is not None:
                    info["resume_ms"] = max(0, int((time.time() - self._spec.resumed_at) * 1000))
                if self._claimed_at is not None:
                    info["pooled"] = True
                    info["claim_ms"] = max(0, int((time.time() - self._claimed_at) * 1000))
                self._emit(EventType.READY, {**info, "resumed": resume})
                first = False
            else:
                self._emit(EventType.CLI_RESTARTED, {**info, **last_exit, "resumed": resume})
            self._ready.set()
            assert self._pump is not None
            code = await self._pump
            self._ready.clear()
            if self._stop.is_set():
                return
            tail = list(self._cli.stderr_tail) if self._cli else []
            logger.warning("claude exited with status %s", code)
            self._complete_turn_synthetic(
                f"Claude Code CLI exited with status {code}", terminal_reason="cli_exited"
            )
            last_exit = {"exit_code": code, "stderr_tail": tail[-10:]}
            if self._note_crash():
                self._fatal(
                    "cli_crash_loop", f"Claude Code CLI keeps exiting (status {code})", tail
                )
                return

    def _note_crash(self) -> bool:
        """Record a CLI death; True when there were too many in the restart window."""
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > self._config.restart_window_s:
            self._crashes.popleft()
        return len(self._crashes) > self._config.max_restarts

    async def _launch(self, *, resume: bool) -> dict[str, Any]:
        args = session_cli_args(self._spec, claude_bin=self._config.claude_bin, resume=resume)
        early, self._early = self._early, None
        if early is not None and early.args == args:
            launched = early.launched
            self._cli = await CliProcess.adopt(early.process)
        else:
            if early is not None:  # started for other flags (cannot happen unless the marker moved)
                logger.warning("the early-started CLI does not match; starting another")
                await (await CliProcess.adopt(early.process)).stop(1.0)
            launched = time.monotonic()
            try:
                self._cli = await CliProcess.spawn(
                    args,
                    cwd=self._config.workspace,
                    uid=self._config.cli_uid,
                    home=self._config.cli_home,
                )
            except OSError as exc:
                raise StartupFailed(str(exc)) from exc
        self._pump = asyncio.create_task(self._read_stdout(self._cli), name="stdout")
        try:
            response = await self._control_request(
                "initialize", {"hooks": None}, timeout_s=self._config.ready_timeout_s
            )
        except (TimeoutError, ConnectionError, StartupFailed) as exc:
            await self._cli.stop(1.0)
            raise StartupFailed(
                f"no answer to initialize ({type(exc).__name__}); "
                f"stderr: {' | '.join(list(self._cli.stderr_tail)[-3:])}"
            ) from exc
        logger.info("claude answered initialize in %.0f ms", (time.monotonic() - launched) * 1000)
        # The ccgate tools are served in-process (sdk_mcp) and need no wait; the session's own
        # MCP servers are processes or remote endpoints the first turn must not wait for.
        mcp = await self._wait_for_mcp() if self._spec.mcp_servers else {}
        logger.info("claude ready in %.0f ms (mcp: %s)", (time.monotonic() - launched) * 1000, mcp)
        return {
            "cli_pid": self._cli.pid,
            "cli_session_id": self._cli_session_id,
            "claude_code_version": response.get("claude_code_version"),
            "permission_mode": response.get("current_permission_mode"),
            "model": self._spec.model,
            "mcp_servers": mcp,
        }

    async def _wait_for_mcp(self) -> dict[str, str]:
        """Poll the CLI's ``mcp_status`` until no MCP server is pending (at most
        ``mcp_ready_timeout_s``), so ``ready`` means the tools are connected and the first turn
        does not wait for them. Returns {server name: status}."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.mcp_ready_timeout_s
        statuses: dict[str, str] = {}
        while True:
            try:
                reply = await self._control_request("mcp_status", {}, timeout_s=5)
            except (TimeoutError, ConnectionError, RuntimeError) as exc:
                logger.warning("mcp_status failed: %s", exc)
                return statuses
            statuses = {
                str(s.get("name")): str(s.get("status")) for s in reply.get("mcpServers") or []
            }
            if "pending" not in statuses.values() or loop.time() > deadline:
                return statuses
            await asyncio.sleep(0.01)

    async def _control_request(
        self, subtype: str, fields: dict[str, Any], *, timeout_s: float
    ) -> dict[str, Any]:
        """Send a control_request and wait for its control_response (raises on error)."""
        assert self._cli is not None and self._pump is not None
        request_id, line = control_request_line(subtype, **fields)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._control_waiters[request_id] = waiter
        try:
            await self._cli.write(line)
            pending: set[asyncio.Future[Any]] = {waiter, self._pump}
            done, _ = await asyncio.wait(
                pending, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if waiter in done:
                return waiter.result()
            if self._pump in done:
                raise StartupFailed("claude exited")
            raise TimeoutError(f"{subtype} got no answer in {timeout_s:.0f}s")
        finally:
            self._control_waiters.pop(request_id, None)

    async def _read_stdout(self, cli: CliProcess) -> int:
        """Publish every stdout line; resolve turn results and control responses."""
        async for raw in cli.lines():
            try:
                obj = json.loads(raw)
            except ValueError:
                logger.info("claude stdout (not JSON): %s", raw[:500].decode(errors="replace"))
                continue
            if not isinstance(obj, dict):
                continue
            kind = obj.get("type")
            if kind == "control_response":
                self._on_control_response(obj)
            elif kind == "control_request":
                request = obj.get("request")
                if isinstance(request, dict) and request.get("subtype") == "mcp_message":
                    # The ccgate tools' transport, not an event of the session.
                    await self._mcp.start(str(obj.get("request_id")), request, cli.write)
                    continue
                await self._refuse_control_request(cli, obj)
            elif kind == "control_cancel_request":
                self._mcp.cancel(str(obj.get("request_id")))
            self._events.emit(
                str(kind),
                raw.decode("utf-8", errors="replace"),
                source=EventSource.CLI,
                turn_id=self._turn.message_id if self._turn else None,
            )
            self._check_journal()
            if kind == "result" and self._result is not None and not self._result.done():
                self._result.set_result(obj)
        self._mcp.close()
        return await cli.wait()

    def _on_control_response(self, obj: dict[str, Any]) -> None:
        response = obj.get("response") or {}
        waiter = self._control_waiters.get(str(response.get("request_id")))
        if waiter is None or waiter.done():
            return
        if response.get("subtype") == "success":
            waiter.set_result(response.get("response") or {})
        else:
            waiter.set_exception(RuntimeError(str(response.get("error"))))

    async def _refuse_control_request(self, cli: CliProcess, obj: dict[str, Any]) -> None:
        """Answer CLI -> host requests we do not serve, so the CLI never waits on us."""
        answer = {
            "type": "control_response",
            "response": {
                "subtype": "error",
                "request_id": obj.get("request_id"),
                "error": "not supported by the ccgate wrapper",
            },
        }
        with contextlib.suppress(ConnectionError):
            await cli.write((json.dumps(answer) + "\n").encode())

    async def _interrupt(self) -> None:
        """Send the CLI's control-protocol interrupt if a turn is running."""
        if self._turn is None or self._cli is None:
            return
        try:
            await self._control_request("interrupt", {}, timeout_s=10)
        except (TimeoutError, ConnectionError, StartupFailed, RuntimeError) as exc:
            logger.warning("interrupt failed: %s", exc)
            self._emit(EventType.ERROR, {"code": "interrupt_failed", "message": str(exc)})
