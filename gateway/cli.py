"""The ``ccgate`` command: serve, token, chat, scripted-model, repos, profiles."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import click
import httpx
import uvicorn
from websockets.asyncio.client import connect

from gateway.auth import mint_token
from gateway.cli_profiles import profiles
from gateway.cli_repos import repos
from gateway.config import Settings


@click.group()
def main() -> None:
    """ccgate: Claude Code as a service."""


@main.command()
@click.option("--host", default=None, help="Bind address (default CCGATE_HOST or 127.0.0.1).")
@click.option("--port", default=None, type=int, help="Port (default CCGATE_PORT or 8000).")
def serve(host: str | None, port: int | None) -> None:
    """Run the gateway."""
    from gateway.logs import configure_logging
    from gateway.main import create_app

    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=host or settings.host,
        port=port or settings.port,
        ws_max_size=settings.max_request_bytes,
        log_config=None,  # configure_logging above owns the handlers (text or JSON)
        log_level=settings.log_level.lower(),
    )


@main.command()
@click.argument("user")
@click.option("--ttl", "ttl_s", default=None, type=int, help="Lifetime in seconds.")
def token(user: str, ttl_s: int | None) -> None:
    """Mint a JWT for USER (an operator command; there is no token route)."""
    settings = Settings()
    click.echo(mint_token(key=settings.jwt_key(), user=user, ttl_s=ttl_s or settings.token_ttl_s))


@main.command("scripted-model")
@click.option("--host", default="0.0.0.0", help="Containers must reach it: not only 127.0.0.1.")
@click.option("--port", default=18765, type=int)
def scripted_model(host: str, port: int) -> None:
    """Run the scripted Messages-API server (offline demos and tests)."""
    from scripted_model import serve as serve_model

    serve_model(host, port)


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


async def _chat(
    url: str, tok: str, session_id: str | None, prompt: str, create: dict[str, Any]
) -> int:
    headers = {"Authorization": f"Bearer {tok}"}
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=60) as http:
        if session_id is None:
            r = await http.post("/api/v1/sessions", json=create)
            if r.status_code != 201:
                click.echo(f"create failed: {r.status_code} {r.text}", err=True)
                return 1
            session_id = r.json()["session_id"]
            click.echo(f"● session {session_id} (container {r.json()['container_id'][:12]})")
        ws_url = url.replace("http", "ws", 1).rstrip("/") + f"/api/v1/sessions/{session_id}/stream"
        async with connect(ws_url, additional_headers=headers, max_size=None) as ws:
            r = await http.post(f"/api/v1/sessions/{session_id}/chat", json={"prompt": prompt})
            if r.status_code != 202:
                click.echo(f"chat failed: {r.status_code} {r.text}", err=True)
                return 1
            message_id = r.json()["message_id"]
            is_error = True
            async for raw in ws:
                event = json.loads(raw)
                line = render(event)
                if line:
                    click.echo(line)
                if event.get("type") == "turn_completed" and event.get("turn_id") == message_id:
                    is_error = bool(event["data"].get("is_error"))
                    break
                if event.get("type") == "exited":
                    break
        # The ledger records the result and collects artifacts just after turn_completed.
        for _ in range(100):
            r = await http.get(f"/api/v1/sessions/{session_id}/messages/{message_id}")
            if r.status_code != 200 or r.json()["status"] not in ("queued", "running"):
                break
            await asyncio.sleep(0.1)
        r = await http.get(f"/api/v1/sessions/{session_id}/artifacts")
        for artifact in r.json().get("artifacts", []):
            click.echo(
                f"  artifact {artifact['path']} {artifact['size']} bytes {artifact['sha256'][:12]}"
            )
        click.echo(f"session {session_id}")
    return 1 if is_error else 0


@main.command()
@click.argument("prompt")
@click.option("--url", default=lambda: os.environ.get("CCGATE_URL", "http://127.0.0.1:8000"))
@click.option(
    "--token", "tok", default=lambda: os.environ.get("CCGATE_TOKEN"), help="JWT (or CCGATE_TOKEN)."
)
@click.option(
    "--session", "session_id", default=None, help="Reuse a session instead of creating one."
)
@click.option("--model", default=None)
@click.option("--workspace", "workspace_id", default=None, help="Persistent workspace id.")
def chat(
    prompt: str,
    url: str,
    tok: str | None,
    session_id: str | None,
    model: str | None,
    workspace_id: str | None,
) -> None:
    """Send PROMPT and print the streamed events until the turn's result."""
    if not tok:
        raise click.UsageError(
            "a token is needed: --token or CCGATE_TOKEN (mint one with `ccgate token USER`)"
        )
    create: dict[str, Any] = {"config": {}}
    if model:
        create["config"]["model"] = model
    if workspace_id:
        create["workspace"] = {"type": "persistent", "id": workspace_id}
    sys.exit(asyncio.run(_chat(url, tok, session_id, prompt, create)))


main.add_command(repos)
main.add_command(profiles)

if __name__ == "__main__":
    main()
