"""``ccgate repos add|ls|show|pull|rm``: registered repositories from the command line (a thin
client of ``/api/v1/repositories``; ``CCGATE_URL`` and ``CCGATE_TOKEN`` as for ``ccgate chat``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
import httpx

from gateway.cli_client import TOKEN_OPTION as _TOKEN
from gateway.cli_client import URL_OPTION as _URL
from gateway.cli_client import answer, client


def describe(repo: dict[str, Any]) -> str:
    """A repository in a few lines."""
    head = repo.get("head") or {}
    lines = [
        f"{repo['name']}  {repo['status']}{' (pulling)' if repo.get('pulling') else ''}",
        f"  url     {repo['git_url']}",
    ]
    if head.get("commit"):
        lines.append(
            f"  head    {head['branch']} {head['commit'][:12]} {head['date']}  {head['subject']}"
        )
    if repo.get("size_bytes") is not None:
        lines.append(f"  size    {repo['size_bytes']} bytes")
    if repo.get("error"):
        lines.append(f"  error   {repo['error']}")
    return "\n".join(lines)


def settle(http: httpx.Client, name: str, timeout_s: float) -> dict[str, Any]:
    """Poll until no clone or pull runs (at most ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        repo: dict[str, Any] = answer(http.get(f"/repositories/{name}"), 200)
        if (repo["status"] != "cloning" and not repo["pulling"]) or time.monotonic() > deadline:
            return repo
        time.sleep(0.5)


@click.group()
def repos() -> None:
    """Registered git repositories (cloned once, copied for each job)."""


@repos.command("add")
@click.argument("name")
@click.argument("git_url")
@click.option("--branch", default=None, help="Default: the remote's default branch.")
@click.option("--description", default=None)
@click.option(
    "--deploy-key",
    "deploy_key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="SSH private key file for an ssh URL.",
)
@click.option("--wait/--no-wait", default=True, help="Wait for the clone (default).")
@click.option("--timeout", "timeout_s", default=900.0, help="Longest wait, seconds.")
@_URL
@_TOKEN
def add(
    name: str,
    git_url: str,
    branch: str | None,
    description: str | None,
    deploy_key: Path | None,
    wait: bool,
    timeout_s: float,
    url: str,
    tok: str | None,
) -> None:
    """Register GIT_URL as NAME and clone it."""
    body: dict[str, Any] = {"name": name, "git_url": git_url}
    if branch:
        body["branch"] = branch
    if description:
        body["description"] = description
    if deploy_key:
        body["deploy_key"] = deploy_key.read_text()
    with client(url, tok) as http:
        repo = answer(http.post("/repositories", json=body), 202)
        if wait:
            repo = settle(http, name, timeout_s)
    click.echo(describe(repo))
    sys.exit(1 if repo["status"] == "failed" else 0)


@repos.command("ls")
@_URL
@_TOKEN
def ls(url: str, tok: str | None) -> None:
    """List your repositories."""
    with client(url, tok) as http:
        listing = answer(http.get("/repositories", params={"limit": 500}), 200)
    for repo in listing["repositories"]:
        commit = (repo["head"].get("commit") or "")[:12]
        click.echo(f"{repo['name']:<30} {repo['status']:<8} {commit:<12} {repo['git_url']}")


@repos.command("show")
@click.argument("name")
@_URL
@_TOKEN
def show(name: str, url: str, tok: str | None) -> None:
    """A repository's status and git metadata."""
    with client(url, tok) as http:
        click.echo(describe(answer(http.get(f"/repositories/{name}"), 200)))


@repos.command("pull")
@click.argument("name")
@click.option("--wait/--no-wait", default=True)
@click.option("--timeout", "timeout_s", default=900.0)
@_URL
@_TOKEN
def pull(name: str, wait: bool, timeout_s: float, url: str, tok: str | None) -> None:
    """Fetch the branch's head into the clone."""
    with client(url, tok) as http:
        repo = answer(http.post(f"/repositories/{name}/pull"), 202)
        if wait:
            repo = settle(http, name, timeout_s)
    click.echo(describe(repo))


@repos.command("rm")
@click.argument("name")
@_URL
@_TOKEN
def rm(name: str, url: str, tok: str | None) -> None:
    """Remove a repository and its clone."""
    with client(url, tok) as http:
        answer(http.delete(f"/repositories/{name}"), 204)
    click.echo(f"removed {name}")
