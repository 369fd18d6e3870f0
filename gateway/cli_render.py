"""One streamed event as a line of the client commands' output (``ccgate chat``, ``ccgate run``);
None for events not worth a line."""

from __future__ import annotations

import json
from typing import Any


def render(event: dict[str, Any]) -> str | None:
    """One line (or a few) for a human, from an event envelope; None to skip it."""
    kind, data = event.get("type"), event.get("data") or {}
    if kind == "ready":
        return f"● ready (Claude Code {data.get('claude_code_version')}, {data.get('model')})"
    if kind == "turn_started":
        return f"● turn {data.get('message_id')} started"
    if kind == "assistant":
        lines = []
        for block in (data.get("message") or {}).get("content") or []:
            if block.get("type") == "text":
                lines.append(block.get("text", ""))
            elif block.get("type") == "tool_use":
                args = json.dumps(block.get("input"), ensure_ascii=False)
                lines.append(f"→ {block.get('name')} {args[:200]}")
        return "\n".join(lines) or None
    if kind == "user":
        content = (data.get("message") or {}).get("content")
        if isinstance(content, list):
            for block in content:
                if block.get("type") == "tool_result":
                    text = block.get("content")
                    text = text if isinstance(text, str) else json.dumps(text)
                    flag = " (error)" if block.get("is_error") else ""
                    return f"← tool result{flag}: {text[:200]}"
        return None
    if kind == "result":
        cost = data.get("total_cost_usd")
        return (
            f"■ result {data.get('subtype')} is_error={data.get('is_error')} "
            f"turns={data.get('num_turns')} {data.get('duration_ms')} ms "
            f"session cost ${cost if cost is not None else 0:.6f}"
        )
    if kind == "turn_completed":
        files = ", ".join(f["path"] for f in data.get("files") or []) or "none"
        return f"● turn completed; files changed: {files}"
    if kind in ("child_spawned", "child_result", "child_failed", "child_stopped"):
        child = str(data.get("child_session_id", ""))[:8]
        detail = data.get("result") or data.get("error") or data.get("status") or ""
        return f"↳ {kind} {child} {str(detail)[:200]}".rstrip()
    if kind in ("error", "cli_restarted", "exited"):
        return f"! {kind}: {json.dumps(data)[:300]}"
    return None
