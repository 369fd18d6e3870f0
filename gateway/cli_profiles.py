"""``ccgate profiles add|ls|show|rm``: MCP profiles from the command line (a thin client of
``/api/v1/mcp-profiles``; ``CCGATE_URL`` and ``CCGATE_TOKEN`` as for ``ccgate chat``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from gateway.cli_client import TOKEN_OPTION, URL_OPTION, answer, client


def describe(profile: dict[str, Any]) -> str:
    """A profile in a few lines (secret names only)."""
    lines = [profile["name"] + (f"  {profile['description']}" if profile["description"] else "")]
    for name, config in profile["servers"].items():
        where = config.get("url") or " ".join([config.get("command", ""), *config.get("args", [])])
        secrets = profile["secret_keys"].get(name, {})
        names = ", ".join(k for keys in secrets.values() for k in keys)
        lines.append(f"  {name:<20} {where}" + (f"  (secrets: {names})" if names else ""))
    return "\n".join(lines)


@click.group()
def profiles() -> None:
    """MCP profiles: reusable MCP servers whose secrets are stored encrypted."""


@profiles.command("add")
@click.argument("name")
@click.argument("servers_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--description", default=None)
@click.option("--replace", is_flag=True, help="Replace an existing profile of that name.")
@URL_OPTION
@TOKEN_OPTION
def add(
    name: str,
    servers_file: Path,
    description: str | None,
    replace: bool,
    url: str,
    tok: str | None,
) -> None:
    """Save SERVERS_FILE (JSON: {"mcpServers": {...}} or the servers object) as NAME."""
    try:
        loaded = json.loads(servers_file.read_text())
    except ValueError as exc:
        raise click.BadParameter(f"{servers_file} is not JSON: {exc}") from exc
    servers = loaded.get("mcpServers", loaded) if isinstance(loaded, dict) else loaded
    body = {"name": name, "description": description, "servers": servers}
    with client(url, tok) as http:
        if replace:
            profile = answer(http.put(f"/mcp-profiles/{name}", json=body), 200)
        else:
            profile = answer(http.post("/mcp-profiles", json=body), 201)
    click.echo(describe(profile))


@profiles.command("ls")
@URL_OPTION
@TOKEN_OPTION
def ls(url: str, tok: str | None) -> None:
    """List your profiles."""
    with client(url, tok) as http:
        listing = answer(http.get("/mcp-profiles", params={"limit": 500}), 200)
    for profile in listing["profiles"]:
        click.echo(f"{profile['name']:<30} {', '.join(profile['servers'])}")


@profiles.command("show")
@click.argument("name")
@URL_OPTION
@TOKEN_OPTION
def show(name: str, url: str, tok: str | None) -> None:
    """A profile's servers and the names of their secrets."""
    with client(url, tok) as http:
        click.echo(describe(answer(http.get(f"/mcp-profiles/{name}"), 200)))


@profiles.command("rm")
@click.argument("name")
@URL_OPTION
@TOKEN_OPTION
def rm(name: str, url: str, tok: str | None) -> None:
    """Remove a profile."""
    with client(url, tok) as http:
        answer(http.delete(f"/mcp-profiles/{name}"), 204)
    click.echo(f"removed {name}")
