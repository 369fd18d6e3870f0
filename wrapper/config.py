"""Wrapper settings, read once from the container's environment."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class WrapperConfig:
    """Environment of the wrapper process.

    ``CCGATE_SESSION_ID`` and ``CCGATE_REDIS_URL`` are required (the URL carries the session's own
    Redis ACL user); the rest have defaults that match container/Dockerfile.
    """

    session_id: str
    redis_url: str
    claude_bin: str = "claude"
    workspace: str = "/workspace"
    state_dir: str = "/home/claude/.claude/ccgate"
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
            state_dir=e.get("CCGATE_STATE_DIR", os.path.join(config_dir, "ccgate")),
            stop_grace_s=float(e.get("CCGATE_STOP_GRACE_S", "5")),
            ready_timeout_s=float(e.get("CCGATE_READY_TIMEOUT_S", "60")),
        )
