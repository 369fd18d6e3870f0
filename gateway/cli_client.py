"""What the client commands (``ccgate repos``, ``ccgate profiles``) share: the gateway URL and
token options, an API client, and turning an answer into JSON or an error exit."""

from __future__ import annotations

import os
import sys
from typing import Any

import click
import httpx

URL_OPTION = click.option(
    "--url",
    default=lambda: os.environ.get("CCGATE_URL", "http://127.0.0.1:8000"),
    help="Gateway (or CCGATE_URL).",
)
TOKEN_OPTION = click.option(
    "--token", "tok", default=lambda: os.environ.get("CCGATE_TOKEN"), help="JWT (or CCGATE_TOKEN)."
)


def client(url: str, tok: str | None) -> httpx.Client:
    """An API client for ``url`` (the ``/api/v1`` root) logged in with ``tok``."""
    if not tok:
        raise click.UsageError(
            "a token is needed: --token or CCGATE_TOKEN (mint one with `ccgate token USER`)"
        )
    return httpx.Client(
        base_url=url.rstrip("/") + "/api/v1",
        headers={"Authorization": f"Bearer {tok}"},
        timeout=60,
    )


def answer(response: httpx.Response, *expected: int) -> Any:
    """The response's JSON when its status is expected; else print the gateway's message and
    exit 1."""
    if response.status_code in expected:
        return response.json() if response.content else None
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    click.echo(f"error {response.status_code}: {detail}", err=True)
    sys.exit(1)
