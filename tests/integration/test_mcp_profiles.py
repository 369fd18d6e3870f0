"""MCP profiles against a real gateway (PostgreSQL, Redis): CRUD, owner scoping, server checks,
and secrets stored encrypted — never returned, not in the database in clear, read back whole
by ``resolve``."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from gateway.auth import mint_token
from gateway.db.engine import make_db_factory, make_engine
from gateway.db.models import McpProfile
from tests.conftest import JWT_SECRET, make_settings
from tests.containers import PostgresContainer, RedisContainer
from tests.servers import GatewayServer

SECRET = "ghp_" + "s3cr3t" * 6
SERVERS = {
    "github": {
        "command": "npx",
        "args": ["-y", "@modelcontextprotocol/server-github"],
        "env": {"GITHUB_TOKEN": SECRET},
    },
    "docs": {"type": "http", "url": "https://docs.example.org/mcp",
             "headers": {"Authorization": f"Bearer {SECRET}"}},
}  # fmt: skip


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
) -> Iterator[GatewayServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("gw-profiles"),
        redis_url=redis_server.url,
        database_url=postgres_server.new_database(),
    )
    server = GatewayServer(settings).start()
    yield server
    server.stop()


@pytest.fixture
async def http(gateway: GatewayServer) -> AsyncIterator[httpx.AsyncClient]:
    token = mint_token(key=JWT_SECRET, user=f"test-{uuid.uuid4().hex[:8]}", ttl_s=3600)
    async with httpx.AsyncClient(
        base_url=f"{gateway.url}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as client:
        yield client


async def test_a_profile_keeps_its_secrets_encrypted_and_never_shows_them(
    http: httpx.AsyncClient, gateway: GatewayServer
) -> None:
    r = await http.post("/mcp-profiles", json={"name": "dev", "servers": SERVERS})
    assert r.status_code == 201, r.text
    assert SECRET not in r.text
    body = r.json()
    assert body["secret_keys"] == {"github": {"env": ["GITHUB_TOKEN"]},
                                   "docs": {"headers": ["Authorization"]}}  # fmt: skip
    assert body["servers"]["github"] == {"command": "npx", "args": SERVERS["github"]["args"]}
    assert body["servers"]["docs"] == {"type": "http", "url": "https://docs.example.org/mcp"}
    for path in ("/mcp-profiles/dev", "/mcp-profiles"):
        shown = await http.get(path)
        assert shown.status_code == 200 and SECRET not in shown.text

    engine = make_engine(gateway.settings.db_url)
    try:
        async with engine.connect() as conn:
            dump = (
                await conn.execute(text("SELECT servers::text, secrets FROM mcp_profile"))
            ).all()
        assert dump and all(SECRET not in " ".join(map(str, row)) for row in dump)
        async with make_db_factory(engine)() as db:
            row = (await db.exec(text("SELECT id FROM mcp_profile WHERE name = 'dev'"))).one()
            profile = await db.get(McpProfile, row[0])
        assert profile is not None
        resolved = gateway.app.state.mcp_profiles.resolve(profile)
        assert resolved == SERVERS
    finally:
        await engine.dispose()


async def test_profiles_are_replaced_deleted_and_scoped_to_their_owner(
    http: httpx.AsyncClient,
) -> None:
    assert (
        await http.post("/mcp-profiles", json={"name": "p", "servers": SERVERS})
    ).status_code == 201
    again = await http.post("/mcp-profiles", json={"name": "p", "servers": SERVERS})
    assert again.status_code == 409 and "already have" in again.text
    slim = {"github": {"command": "gh-mcp"}}
    r = await http.put("/mcp-profiles/p", json={"name": "p", "servers": slim, "description": "d"})
    assert r.status_code == 200, r.text
    assert r.json()["servers"] == slim and r.json()["secret_keys"] == {}
    assert r.json()["description"] == "d"
    other = mint_token(key=JWT_SECRET, user="test-someone-else", ttl_s=3600)
    headers = {"Authorization": f"Bearer {other}"}
    for method, path in (("GET", "/mcp-profiles/p"), ("DELETE", "/mcp-profiles/p")):
        assert (await http.request(method, path, headers=headers)).status_code == 404
    session_token = mint_token(key=JWT_SECRET, user="x", ttl_s=60, session_scope="s-1")
    r = await http.get("/mcp-profiles", headers={"Authorization": f"Bearer {session_token}"})
    assert r.status_code == 403
    assert (await http.delete("/mcp-profiles/p")).status_code == 204
    assert (await http.get("/mcp-profiles/p")).status_code == 404
    assert (await http.get("/mcp-profiles")).json()["total"] == 0


@pytest.mark.parametrize(
    ("servers", "says"),
    [
        ({}, "at least one"),
        ({"ccgate": {"command": "x"}}, "not ccgate"),
        ({"a b": {"command": "x"}}, "names are"),
        ({"s": {"type": "ws", "url": "wss://x"}}, "type must be stdio, http or sse"),
        ({"s": {"args": ["x"]}}, "needs a command"),
        ({"s": {"command": "x", "args": "y"}}, "args must be a list of strings"),
        ({"s": {"command": "x", "url": "https://x"}}, "unknown field(s) for stdio: url"),
        ({"s": {"type": "sse", "url": "ftp://x"}}, "needs an http(s) url"),
        ({"s": {"command": "x", "env": {"K": 1}}}, "env must map names to strings"),
    ],
)
async def test_bad_servers_are_refused_saying_what_to_fix(
    http: httpx.AsyncClient, servers: dict[str, object], says: str
) -> None:
    r = await http.post("/mcp-profiles", json={"name": "bad", "servers": servers})
    assert r.status_code == 422, r.text
    assert says in r.json()["detail"]


def test_the_profiles_command_saves_lists_shows_and_removes(
    gateway: GatewayServer, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from gateway.cli import main

    token = mint_token(key=JWT_SECRET, user=f"test-{uuid.uuid4().hex[:8]}", ttl_s=3600)
    env = {"CCGATE_URL": gateway.url, "CCGATE_TOKEN": token}
    servers = tmp_path / "mcp.json"
    servers.write_text(json.dumps({"mcpServers": SERVERS}))
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(main, ["profiles", *args], env=env)
        assert result.exit_code == 0, result.output
        return result.output

    added = run("add", "dev", str(servers), "--description", "for dev")
    assert "github" in added and "secrets: GITHUB_TOKEN" in added and SECRET not in added
    assert "dev" in run("ls")
    shown = run("show", "dev")
    assert "https://docs.example.org/mcp" in shown and "secrets: Authorization" in shown
    servers.write_text(json.dumps({"gh": {"command": "gh-mcp"}}))
    assert "gh-mcp" in run("add", "dev", str(servers), "--replace")
    assert "removed dev" in run("rm", "dev")
    missing = runner.invoke(main, ["profiles", "show", "dev"], env=env)
    assert missing.exit_code == 1 and "error 404" in missing.output
