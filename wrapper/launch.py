"""What the CLI is launched with, and launching it before the wrapper has imported its runtime.

The argv (``build_cli_args``), the environment (``cli_environment``), whether a transcript is
continued (``transcript_cli_id``) and the process itself (``popen_cli``) are decided here, once,
for every launch. ``launch_early`` runs first thing in ``python -m wrapper``: with the session's
spec in ``CCGATE_SPEC`` (the gateway passes it when it fits) it starts the CLI before asyncio and
redis-py are imported, so their ~110 ms of imports overlap the CLI's own start instead of
preceding it. The runner then adopts that process (``CliProcess.adopt``).

Imports are kept to the standard library's light modules and ``wrapper.protocol``: everything
imported here is paid before the CLI starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from typing import Any

from wrapper.mcp_tools import SDK_SERVER_CONFIG, SERVER_NAME
from wrapper.protocol import SessionSpec

SPEC_ENV = "CCGATE_SPEC"
"""The session's SessionSpec JSON, when the gateway passed it in the environment."""
MARKER_FILE = "cli-session.json"
"""In the marker dir (config volume): ``{"transcript": true, "cli_session_id": …}`` once the CLI
has written a transcript, so a new container continues it with ``--resume``."""
_WRAPPER_ONLY = ("CLAUDECODE", "CCGATE_REDIS_URL", SPEC_ENV)


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
    if spec.json_schema is not None:
        args.append(f"--json-schema={json.dumps(spec.json_schema, separators=(',', ':'))}")
    mcp_servers = {**spec.mcp_servers, **(extra_mcp_servers or {})}
    if mcp_servers:
        args.append(f"--mcp-config={json.dumps({'mcpServers': mcp_servers})}")
    if spec.include_partial_messages:
        args.append("--include-partial-messages")
    return args


def session_cli_args(spec: SessionSpec, *, claude_bin: str, resume: bool) -> list[str]:
    """The argv of a session's CLI: its spec's flags plus the ccgate tools (an SDK MCP server
    served by the wrapper) when the session has a gateway to call."""
    extra = {SERVER_NAME: SDK_SERVER_CONFIG} if spec.gateway_url else None
    return build_cli_args(spec, claude_bin=claude_bin, resume=resume, extra_mcp_servers=extra)


def transcript_cli_id(marker_dir: str, spec: SessionSpec) -> str | None:
    """The CLI session id of the transcript on the config volume (from the marker), or None
    when there is none yet (then the CLI starts with ``--session-id``)."""
    try:
        with open(os.path.join(marker_dir, MARKER_FILE)) as fh:
            marker = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not marker.get("transcript"):
        return None
    return str(marker.get("cli_session_id") or spec.session_id)


def cli_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The CLI's environment: ours minus wrapper-only variables and CLAUDECODE.

    ``CLAUDECODE`` makes 2.1.39+ refuse to start ("cannot be launched inside another Claude Code
    session"); ``CCGATE_REDIS_URL`` holds the session's Redis credentials, which the agent's
    Bash tool must not see; ``CCGATE_SPEC`` is the wrapper's copy of the session spec.
    """
    env = dict(os.environ if base is None else base)
    for name in _WRAPPER_ONLY:
        env.pop(name, None)
    return env


def popen_cli(args: list[str], *, cwd: str, uid: int | None, home: str) -> subprocess.Popen[bytes]:
    """Start the CLI with piped stdio in its own session (as ``uid`` and its group, with no
    supplementary groups, when given: the kernel then clears every capability the wrapper
    holds). Raises OSError when the binary cannot be run or the user not switched to."""
    env = cli_environment()
    as_user: dict[str, Any] = {}
    if uid is not None:
        env.update(HOME=home, USER="claude", LOGNAME="claude")
        as_user = {"user": uid, "group": uid, "extra_groups": []}
    return subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        **as_user,
    )


@dataclasses.dataclass
class EarlyLaunch:
    """A CLI started by ``launch_early``: the spec it was started for, its argv, the
    process and when (``time.monotonic()``)."""

    spec: SessionSpec
    args: list[str]
    process: subprocess.Popen[bytes]
    launched: float


def launch_early(
    environ: dict[str, str], *, claude_bin: str, workspace: str, marker_dir: str,
    uid: int | None, home: str,
) -> EarlyLaunch | None:  # fmt: skip
    """Start the session's CLI from ``CCGATE_SPEC`` if it is there, names this container's
    session and is not a warm-pool spec; None otherwise, or if the spec does not parse or the
    CLI cannot be started (the runner then starts it the usual way and reports why)."""
    raw = environ.get(SPEC_ENV)
    if not raw:
        return None
    try:
        spec = SessionSpec.from_json(raw)
    except (ValueError, KeyError, TypeError):
        return None
    if spec.pooled or spec.session_id != environ.get("CCGATE_SESSION_ID"):
        return None
    cli_id = transcript_cli_id(marker_dir, spec)
    if cli_id is not None and cli_id != (spec.cli_session_id or spec.session_id):
        spec = dataclasses.replace(spec, cli_session_id=cli_id)
    args = session_cli_args(spec, claude_bin=claude_bin, resume=cli_id is not None)
    try:
        process = popen_cli(args, cwd=workspace, uid=uid, home=home)
    except OSError:
        return None
    return EarlyLaunch(spec, args, process, time.monotonic())
