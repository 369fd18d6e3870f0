"""The session runner: one long-lived CLI, turns from Redis, every stdout line out as an event.

Life of a container:
    launch CLI (``--session-id``) -> ``initialize`` handshake -> ``ready``
    loop: BLPOP a TurnRequest -> ``turn_started`` -> user line on stdin -> CLI lines ...
          -> ``result`` -> workspace diff -> ``turn_completed``
    CLI dies -> the running turn completes as failed -> relaunch with ``--resume`` ->
          ``cli_restarted`` (more than ``max_restarts`` deaths in ``restart_window_s`` -> ``error``)
    SIGTERM -> close stdin, wait, SIGTERM, SIGKILL the CLI -> ``exited``
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections import deque
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from wrapper.cli_process import (
    CliProcess,
    build_cli_args,
    ccgate_mcp_server,
    cli_environment,
    control_request_line,
    user_message_line,
)
from wrapper.config import WrapperConfig
from wrapper.protocol import (
    ControlMessage,
    ControlType,
    EventSource,
    EventType,
    SessionSpec,
    TurnRequest,
    control_key,
    input_key,
    token_key,
)
from wrapper.publisher import EventPublisher
from wrapper.workspace import WorkspaceTracker

logger = logging.getLogger(__name__)

_INTERRUPT_GRACE_S = 15.0
_BLPOP_TIMEOUT_S = 2


class StartupFailed(Exception):
    """The CLI exited or stayed silent before answering the ``initialize`` handshake."""


class SessionRunner:
    """Drives the CLI for one session; ``run()`` returns the wrapper's exit status."""

    def __init__(
        self,
        config: WrapperConfig,
        spec: SessionSpec,
        *,
        publisher: EventPublisher,
        input_redis: aioredis.Redis,
        control_redis: aioredis.Redis,
        state_redis: aioredis.Redis,
    ) -> None:
        self._config = config
        self._spec = spec
        self._events = publisher
        self._input_redis = input_redis
        self._control_redis = control_redis
        self._state_redis = state_redis
        self._token_file = os.path.join(config.state_dir, "gateway-token")
        self._workspace = WorkspaceTracker(config.workspace)
        self._cli: CliProcess | None = None
        self._pump: asyncio.Task[int] | None = None
        self._ready = asyncio.Event()
        self._turn_idle = asyncio.Event()
        self._stop = asyncio.Event()
        self._turn: TurnRequest | None = None
        self._result: asyncio.Future[dict[str, Any]] | None = None
        self._control_waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._crashes: deque[float] = deque()
        self._exit_status = 0
        self._state_file = os.path.join(config.state_dir, "cli-session.json")

    def request_stop(self) -> None:
        """Begin a graceful stop (SIGTERM handler)."""
        self._stop.set()

    # ----------------------------------------------------------------------------- events

    def _emit(self, event_type: EventType, data: dict[str, Any]) -> int:
        seq = self._events.emit(
            event_type.value,
            json.dumps(data),
            source=EventSource.WRAPPER,
            turn_id=self._turn.message_id if self._turn else None,
        )
        self._check_journal()
        return seq

    # ----------------------------------------------------------------------------- main

    async def run(self) -> int:
        """Run until stopped; emits ``exited`` last and returns the process exit status."""
        await asyncio.to_thread(self._workspace.baseline)
        tasks = [
            asyncio.create_task(self._supervise(), name="supervise"),
            asyncio.create_task(self._turn_loop(), name="turns"),
            asyncio.create_task(self._control_loop(), name="control"),
        ]
        if self._spec.gateway_url:
            tasks.append(asyncio.create_task(self._token_loop(), name="token"))
        await self._until_stop_or_failure(tasks)
        reason = "crashed" if self._exit_status else "stopped"
        exit_code: int | None = None
        if self._cli is not None:
            if self._turn is not None and self._cli.returncode is None:
                # Interrupt the running turn first so the CLI ends it cleanly and quickly.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._interrupt(), 2)
                if self._result is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(self._result), 2)
            exit_code = await self._cli.stop(self._config.stop_grace_s)
        self._complete_turn_synthetic("the session was stopped", terminal_reason="stopped")
        if self._turn is not None:
            # Let the running turn publish its turn_completed before the loops are cancelled.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._turn_idle.wait(), 10)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._emit(EventType.EXITED, {"reason": reason, "cli_exit_code": exit_code})
        await self._events.close(timeout_s=10)
        return self._exit_status

    async def _until_stop_or_failure(self, tasks: list[asyncio.Task[None]]) -> None:
        """Wait for a stop request; a loop that dies first ends the session visibly (an
        ``error`` event naming it, then ``exited crashed``) instead of leaving a container
        that neither publishes nor exits."""
        stop = asyncio.create_task(self._stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        for task in done:
            if task is stop or self._stop.is_set():
                continue
            failure = None if task.cancelled() else task.exception()
            logger.error("wrapper task %s ended: %r", task.get_name(), failure)
            self._fatal(
                "wrapper_task_failed",
                f"wrapper task {task.get_name()} ended unexpectedly: {failure!r}",
                list(self._cli.stderr_tail) if self._cli else [],
            )

    def _check_journal(self) -> None:
        """End the session when the outbox can no longer journal (e.g. its volume is full)."""
        problem = self._events.journal_error
        if problem is not None and not self._stop.is_set():
            self._events.journal_error = None
            self._fatal("outbox_failed", f"cannot journal events: {problem}", [])

    # ------------------------------------------------------------------------- CLI life

    def _transcript_exists(self) -> bool:
        try:
            with open(self._state_file) as fh:
                return bool(json.load(fh).get("transcript"))
        except (OSError, ValueError):
            return False

    def _mark_transcript(self) -> None:
        if self._transcript_exists():
            return
        os.makedirs(self._config.state_dir, exist_ok=True)
        with open(self._state_file, "w") as fh:
            json.dump({"transcript": True, "cli_session_id": self._spec.session_id}, fh)

    async def _supervise(self) -> None:
        first = True
        last_exit: dict[str, Any] = {}
        while not self._stop.is_set():
            resume = self._transcript_exists()
            try:
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

    def _fatal(self, code: str, message: str, stderr_tail: list[str]) -> None:
        self._emit(
            EventType.ERROR, {"code": code, "message": message, "stderr_tail": stderr_tail[-10:]}
        )
        self._exit_status = 1
        self._stop.set()

    async def _launch(self, *, resume: bool) -> dict[str, Any]:
        extra = None
        if self._spec.gateway_url:
            extra = {
                "ccgate": ccgate_mcp_server(
                    python=sys.executable,
                    gateway_url=self._spec.gateway_url,
                    session_id=self._spec.session_id,
                    token_file=self._token_file,
                )
            }
        args = build_cli_args(
            self._spec, claude_bin=self._config.claude_bin, resume=resume, extra_mcp_servers=extra
        )
        try:
            self._cli = await CliProcess.spawn(
                args, cwd=self._config.workspace, env=cli_environment()
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
        mcp = await self._wait_for_mcp() if (extra or self._spec.mcp_servers) else {}
        return {
            "cli_pid": self._cli.pid,
            "cli_session_id": self._spec.session_id,
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
            await asyncio.sleep(0.05)

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
                await self._refuse_control_request(cli, obj)
            self._events.emit(
                str(kind),
                raw.decode("utf-8", errors="replace"),
                source=EventSource.CLI,
                turn_id=self._turn.message_id if self._turn else None,
            )
            self._check_journal()
            if kind == "result" and self._result is not None and not self._result.done():
                self._result.set_result(obj)
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

    # ---------------------------------------------------------------------------- turns

    async def _turn_loop(self) -> None:
        key = input_key(self._spec.session_id)
        while not self._stop.is_set():
            await self._ready.wait()
            try:
                item = await self._input_redis.blpop([key], timeout=_BLPOP_TIMEOUT_S)
            except (RedisError, OSError) as exc:
                logger.warning("input: redis unreachable: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if item is None:
                continue
            try:
                request = TurnRequest.from_json(item[1])
            except (ValueError, KeyError) as exc:
                self._emit(EventType.ERROR, {"code": "bad_turn_request", "message": str(exc)})
                continue
            await self._run_turn(request)

    async def _run_turn(self, request: TurnRequest) -> None:
        loop = asyncio.get_running_loop()
        self._turn = request
        self._turn_idle.clear()
        self._result = loop.create_future()
        started = time.monotonic()
        self._emit(EventType.TURN_STARTED, {"message_id": request.message_id})
        try:
            assert self._cli is not None
            await self._cli.write(user_message_line(request.prompt))
            self._mark_transcript()
            result = await self._await_result(request)
        except ConnectionError as exc:
            result = _synthetic_result(f"could not write to the CLI: {exc}", "cli_exited")
        files, deleted = await asyncio.to_thread(self._workspace.changes)
        self._emit(
            EventType.TURN_COMPLETED,
            {
                "message_id": request.message_id,
                "subtype": result.get("subtype"),
                "is_error": bool(result.get("is_error")),
                "result": result.get("result"),
                "errors": result.get("errors"),
                "terminal_reason": result.get("terminal_reason"),
                "usage": result.get("usage"),
                "total_cost_usd": result.get("total_cost_usd"),
                "num_turns": result.get("num_turns"),
                "duration_ms": result.get("duration_ms", int((time.monotonic() - started) * 1000)),
                "cli_session_id": result.get("session_id", self._spec.session_id),
                "files": [f.as_dict() for f in files],
                "deleted_files": deleted,
                "workspace_truncated": self._workspace.truncated,
            },
        )
        self._turn = None
        self._result = None
        self._turn_idle.set()

    async def _await_result(self, request: TurnRequest) -> dict[str, Any]:
        assert self._result is not None
        timeout_s = request.timeout_seconds or self._spec.timeout_seconds
        try:
            return await asyncio.wait_for(asyncio.shield(self._result), timeout_s)
        except TimeoutError:
            pass
        self._emit(
            EventType.ERROR,
            {"code": "turn_timeout", "message": f"turn exceeded {timeout_s:g}s; interrupting"},
        )
        await self._interrupt()
        try:
            return await asyncio.wait_for(asyncio.shield(self._result), _INTERRUPT_GRACE_S)
        except TimeoutError:
            # The CLI ignored the interrupt: kill it; the supervisor restarts it with --resume.
            if self._cli is not None:
                await self._cli.stop(1.0)
            return await self._result

    def _complete_turn_synthetic(self, message: str, *, terminal_reason: str) -> None:
        if self._result is not None and not self._result.done():
            self._result.set_result(_synthetic_result(message, terminal_reason))

    # -------------------------------------------------------------------------- control

    async def _control_loop(self) -> None:
        key = control_key(self._spec.session_id)
        while not self._stop.is_set():
            try:
                item = await self._control_redis.blpop([key], timeout=_BLPOP_TIMEOUT_S)
            except (RedisError, OSError) as exc:
                logger.warning("control: redis unreachable: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if item is None:
                continue
            try:
                message = ControlMessage.from_json(item[1])
            except (ValueError, KeyError) as exc:
                self._emit(EventType.ERROR, {"code": "bad_control_message", "message": str(exc)})
                continue
            if message.type is ControlType.INTERRUPT:
                await self._interrupt()
            elif message.type is ControlType.NOTIFY and message.event:
                self._events.emit(
                    message.event,
                    json.dumps(message.data or {}),
                    source=EventSource.GATEWAY,
                    turn_id=self._turn.message_id if self._turn else None,
                )

    async def _token_loop(self) -> None:
        """Copy the gateway-renewed session token from Redis into the file the MCP tools read."""
        key = token_key(self._spec.session_id)
        current: bytes | None = None
        while True:
            try:
                token = cast(bytes | None, await self._state_redis.get(key))
            except (RedisError, OSError) as exc:
                logger.warning("token: redis unreachable: %s", exc)
                token = None
            if token and token != current:
                await asyncio.to_thread(_write_private, self._token_file, token)
                current = token
            await asyncio.sleep(1.0 if current is None else 20.0)

    async def _interrupt(self) -> None:
        """Send the CLI's control-protocol interrupt if a turn is running."""
        if self._turn is None or self._cli is None:
            return
        try:
            await self._control_request("interrupt", {}, timeout_s=10)
        except (TimeoutError, ConnectionError, StartupFailed, RuntimeError) as exc:
            logger.warning("interrupt failed: %s", exc)
            self._emit(EventType.ERROR, {"code": "interrupt_failed", "message": str(exc)})


def _write_private(path: str, data: bytes) -> None:
    """Write a file readable only by this user, atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _synthetic_result(message: str, terminal_reason: str) -> dict[str, Any]:
    """A result for a turn the CLI could not finish itself (shape of a CLI error result)."""
    return {
        "type": "result",
        "subtype": "error_during_execution",
        "is_error": True,
        "result": None,
        "errors": [message],
        "terminal_reason": terminal_reason,
    }
