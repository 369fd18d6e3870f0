"""The ``ccgate`` command: serve, token, chat, scripted-model, repos, profiles, run, jobs."""

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
from gateway.cli_jobs import jobs, run
from gateway.cli_profiles import profiles
from gateway.cli_render import render
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
main.add_command(jobs)
main.add_command(run)

if __name__ == "__main__":
    main()
