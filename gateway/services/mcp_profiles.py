"""MCP profiles: named, reusable sets of MCP servers (claude-code-ops' ``/api/mcp-profiles``).

A profile's servers are Claude Code ``--mcp-config`` entries: stdio (``command``, ``args``,
``env``) or remote (``type: http | sse``, ``url``, ``headers``). Every ``env`` and ``headers``
value is a secret: it is split out and stored sealed (``SecretBox``), the stored configs keep
the names with the value blanked, and the API shows only the names (``secret_keys``).
``resolve`` puts the values back, for the container that runs the servers.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.auth.secret_box import SecretBox, SecretUnreadable
from gateway.db.models import McpProfile, utcnow
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.services import owned

SERVER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_SERVERS = 20
SECRET_FIELDS = ("env", "headers")
_STDIO_KEYS = {"type", "command", "args", "env"}
_REMOTE_KEYS = {"type", "url", "headers"}
PROFILE_SERVERS_KEY = "mcp_profile_servers"
"""Key in a session's stored config: its profiles' servers, resolved at create and sealed."""
RESERVED = frozenset({"ccgate"})
"""Server names ccgate itself uses in every session."""


def check_servers(servers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The servers if each is a valid MCP server config; raises InvalidRequest naming the
    server and what to fix."""
    if not servers:
        raise InvalidRequest("servers must name at least one MCP server")
    if len(servers) > MAX_SERVERS:
        raise InvalidRequest(f"at most {MAX_SERVERS} servers in a profile")
    checked: dict[str, dict[str, Any]] = {}
    for name, config in servers.items():
        where = f"server {name!r}"
        if not SERVER_NAME.match(name) or name in RESERVED:
            raise InvalidRequest(
                f"{where}: names are 1-64 letters, digits, '_' or '-' (not ccgate)"
            )
        if not isinstance(config, dict):
            raise InvalidRequest(f"{where}: its config must be an object")
        kind = config.get("type", "stdio")
        allowed = _STDIO_KEYS if kind == "stdio" else _REMOTE_KEYS
        if kind not in ("stdio", "http", "sse"):
            raise InvalidRequest(f"{where}: type must be stdio, http or sse")
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise InvalidRequest(f"{where}: unknown field(s) for {kind}: {', '.join(unknown)}")
        if kind == "stdio":
            if not isinstance(config.get("command"), str) or not config["command"]:
                raise InvalidRequest(f"{where}: a stdio server needs a command (string)")
            args = config.get("args", [])
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise InvalidRequest(f"{where}: args must be a list of strings")
        else:
            url = config.get("url")
            if not isinstance(url, str) or not url.startswith(("https://", "http://")):
                raise InvalidRequest(f"{where}: an {kind} server needs an http(s) url")
        for field in SECRET_FIELDS:
            values = config.get(field, {})
            if not isinstance(values, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in values.items()
            ):
                raise InvalidRequest(f"{where}: {field} must map names to strings")
        checked[name] = dict(config)
    return checked


def split_secrets(
    servers: dict[str, dict[str, Any]],
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, dict[str, str]]]]:
    """(configs with every env/headers value blanked, {server: {field: {name: value}}})."""
    public: dict[str, dict[str, Any]] = {}
    secrets: dict[str, dict[str, dict[str, str]]] = {}
    for name, config in servers.items():
        shown = dict(config)
        for field in SECRET_FIELDS:
            values = config.get(field)
            if values:
                secrets.setdefault(name, {})[field] = dict(values)
                shown[field] = dict.fromkeys(values, "")
        public[name] = shown
    return public, secrets


class McpProfiles:
    """CRUD of a user's profiles, and their resolution for a container."""

    def __init__(self, secret_box: SecretBox) -> None:
        self._box = secret_box

    def _sealed(self, servers: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        public, secrets = split_secrets(check_servers(servers))
        return public, self._box.seal(json.dumps(secrets)) if secrets else None

    async def create(
        self,
        db: AsyncSession,
        *,
        owner: str,
        name: str,
        description: str | None,
        servers: dict[str, Any],
    ) -> McpProfile:
        """Save a profile; InvalidRequest for a bad name or server, Conflict for a taken name."""
        owned.check_name(name)
        public, sealed = self._sealed(servers)
        profile = McpProfile(
            id=str(uuid.uuid4()),
            owner=owner,
            name=name,
            description=description,
            servers=public,
            secrets=sealed,
        )
        db.add(profile)
        try:
            await db.commit()
        except IntegrityError as exc:
            await db.rollback()
            raise Conflict(f"you already have an MCP profile named {name!r}") from exc
        return profile

    async def replace(
        self,
        db: AsyncSession,
        *,
        owner: str,
        name: str,
        description: str | None,
        servers: dict[str, Any],
    ) -> McpProfile:
        """Replace a profile's description and servers (secrets included)."""
        profile = await self.get(db, owner=owner, name=name)
        profile.servers, profile.secrets = self._sealed(servers)
        profile.description = description
        profile.updated_at = utcnow()
        db.add(profile)
        await db.commit()
        return profile

    async def list(
        self, db: AsyncSession, *, owner: str, limit: int, offset: int
    ) -> tuple[list[McpProfile], int]:
        """The owner's profiles by name, one page, and how many there are."""
        return await owned.page(db, McpProfile, owner=owner, limit=limit, offset=offset)

    async def get(self, db: AsyncSession, *, owner: str, name: str) -> McpProfile:
        """The owner's profile called ``name``; NotFound otherwise (also another user's)."""
        return await owned.by_name(db, McpProfile, owner=owner, name=name, what="MCP profile")

    async def delete(self, db: AsyncSession, *, owner: str, name: str) -> None:
        """Remove a profile (sessions that started with it keep their servers)."""
        profile = await self.get(db, owner=owner, name=name)
        await db.exec(delete(McpProfile).where(col(McpProfile.id) == profile.id))
        await db.commit()

    def resolve(self, profile: McpProfile) -> dict[str, dict[str, Any]]:
        """The profile's servers with their secret values, as ``--mcp-config`` entries.
        Raises InvalidRequest when the secrets cannot be decrypted (the deployment's secret
        changed: save the profile again)."""
        servers = {name: dict(config) for name, config in profile.servers.items()}
        if profile.secrets is None:
            return servers
        try:
            secrets: dict[str, dict[str, dict[str, str]]] = json.loads(
                self._box.open(profile.secrets)
            )
        except SecretUnreadable as exc:
            raise InvalidRequest(
                f"MCP profile {profile.name!r} cannot be decrypted (the deployment's secret "
                "changed); save it again"
            ) from exc
        for name, fields in secrets.items():
            if name in servers:
                servers[name].update(fields)
        return servers


BUILTIN_PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "code-search": {
        "code-search": {
            "command": "python3",
            "args": ["-m", "wrapper.code_search", "/workspace"],
            "env": {"PYTHONPATH": "/opt/ccgate/app"},
        }
    },
}
"""Profiles every user has without making them (a user's own profile of the same name wins):
``code-search`` — the workspace's code index and a live grep (wrapper/code_search.py)."""


async def attach(
    db: AsyncSession,
    profiles: McpProfiles,
    *,
    owner: str,
    names: list[str],
    own_servers: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """The servers of the owner's profiles ``names`` (secrets included; a built-in profile when
    the owner has none of that name), for a session whose config also has ``own_servers``.
    Raises InvalidRequest for an unknown profile or a server name given twice."""
    servers: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            profile = await profiles.get(db, owner=owner, name=name)
            resolved = profiles.resolve(profile)
        except NotFound as exc:
            if name not in BUILTIN_PROFILES:
                raise InvalidRequest(f"config.mcp_profiles: no MCP profile named {name!r}") from exc
            resolved = BUILTIN_PROFILES[name]
        for server, config in resolved.items():
            if server in servers or server in own_servers:
                raise InvalidRequest(
                    f"config.mcp_profiles: MCP server {server!r} is defined twice "
                    f"(profile {name!r} and another profile or config.mcp_servers)"
                )
            servers[server] = config
    return servers


def sealed_servers(box: SecretBox, config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The profile servers sealed into a session's stored config (none: {})."""
    sealed = config.get(PROFILE_SERVERS_KEY)
    if not sealed:
        return {}
    servers: dict[str, dict[str, Any]] = json.loads(box.open(str(sealed)))
    return servers


def secret_keys(profile: McpProfile) -> dict[str, dict[str, list[str]]]:
    """{server: {env|headers: [names]}} of a profile's secrets (the values never leave)."""
    keys: dict[str, dict[str, list[str]]] = {}
    for name, config in profile.servers.items():
        for field in SECRET_FIELDS:
            if config.get(field):
                keys.setdefault(name, {})[field] = sorted(config[field])
    return keys
