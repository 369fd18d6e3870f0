"""Wrapper settings, read once from the container's environment."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class WrapperConfig:
    """Environment of the wrapper process.

    ``CCGATE_SESSION_ID`` and ``CCGATE_REDIS_URL`` are required (the URL carries the session's own
    Redis ACL user); the rest have defaults that match container/Dockerfile.

    Privilege split: in a session container the wrapper runs as root with only the SETUID,
    SETGID, KILL and DAC_READ_SEARCH capabilities and starts the CLI as ``cli_uid`` (1000, the
    user the agent's tools run as). ``state_dir`` (the outbox) is root's alone, so the agent
    cannot read the Redis login or forge envelopes through it, and the session token of the
    ccgate tools stays in the wrapper's memory (they are served in-process); ``marker_dir``
    (on the config volume) remembers that a transcript exists, for ``--resume``.
    """

    session_id: str
    redis_url: str
    claude_bin: str = "claude"
    workspace: str = "/workspace"
    state_dir: str = "/var/lib/ccgate"
    marker_dir: str = "/home/claude/.claude/ccgate"
    cli_uid: int | None = None
    """Run the CLI as this uid (and gid); None: as the wrapper's own user."""
    cli_home: str = "/home/claude"
    stop_grace_s: float = 5.0
    ready_timeout_s: float = 60.0
    mcp_ready_timeout_s: float = 15.0
    max_restarts: int = 3
    restart_window_s: float = 60.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> WrapperConfig:
        """Build from ``os.environ``; raises KeyError naming a missing required variable."""
        e = dict(os.environ if env is None else env)
        config_dir = e.get("CLAUDE_CONFIG_DIR", "/home/claude/.claude")
        return cls(
            session_id=e["CCGATE_SESSION_ID"],
            redis_url=e["CCGATE_REDIS_URL"],
            claude_bin=e.get("CCGATE_CLAUDE_BIN", "claude"),
            workspace=e.get("CCGATE_WORKSPACE", "/workspace"),
            state_dir=e.get("CCGATE_STATE_DIR", "/var/lib/ccgate"),
            marker_dir=e.get("CCGATE_MARKER_DIR", os.path.join(config_dir, "ccgate")),
            cli_uid=_cli_uid(e),
            cli_home=e.get("CCGATE_CLI_HOME", "/home/claude"),
            stop_grace_s=float(e.get("CCGATE_STOP_GRACE_S", "5")),
            ready_timeout_s=float(e.get("CCGATE_READY_TIMEOUT_S", "60")),
        )


def _cli_uid(env: dict[str, str]) -> int | None:
    """``CCGATE_CLI_UID``, else 1000 when the wrapper runs as root, else None (same user)."""
    if "CCGATE_CLI_UID" in env:
        return int(env["CCGATE_CLI_UID"])
    return 1000 if os.geteuid() == 0 else None
