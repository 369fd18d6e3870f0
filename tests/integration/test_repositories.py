"""Registered repositories against a real gateway (PostgreSQL, Redis) and real git: clone from a
file URL, metadata, pull of a new upstream commit, a broken remote, the URL policy, the size
limit and the clone timeout (a remote that never answers), owner scoping, delete, and a clone
left behind by a stopped replica taken over by the recovery loop."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.auth import mint_token
from gateway.db.engine import make_db_factory, make_engine
from gateway.db.models import Repository, RepositoryStatus
from gateway.services import repo_work as repositories_module
from tests.conftest import JWT_SECRET, make_settings
from tests.containers import PostgresContainer, RedisContainer
from tests.servers import GatewayServer, PostgresServer

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.org",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.org",
    # Clones belong to the session user (uid 1000).
    "GIT_CONFIG_COUNT": "1",
    "GIT_CONFIG_KEY_0": "safe.directory",
    "GIT_CONFIG_VALUE_0": "*",
}


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True, text=True
    ).stdout.strip()


def make_upstream(path: Path, files: dict[str, bytes | str]) -> str:
    """A repository with one commit of ``files`` on branch main; returns the commit."""
    path.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=path)
    for name, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        (path / name).write_bytes(data)
    git("add", "-A", cwd=path)
    git("commit", "-q", "-m", "first commit", cwd=path)
    return git("rev-parse", "HEAD", cwd=path)


@pytest.fixture(scope="module")
def hanging_remote() -> Iterator[str]:
    """An http URL whose server accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/repo.git"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("upstreams")


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    roots: Path,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
) -> Iterator[GatewayServer]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(repositories_module, "RECOVER_INTERVAL_S", 0.5)
        patch.setattr(repositories_module, "STALE_S", 3.0)
        patch.setattr(repositories_module, "HEARTBEAT_S", 1.0)
        patch.setattr(repositories_module, "SIZE_CHECK_S", 0.2)
        settings = make_settings(
            tmp_path_factory.mktemp("gw-repos"),
            redis_url=redis_server.url,
            database_url=postgres_server.new_database(),
            repo_file_roots=[roots],
            repo_allow_http=True,
            repo_max_bytes=2 * 1024 * 1024,
            repo_clone_timeout_s=4,
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


async def settled(http: httpx.AsyncClient, name: str, timeout_s: float = 30) -> dict[str, Any]:
    """The repository once no clone or pull runs."""
    async with asyncio.timeout(timeout_s):
        while True:
            r = await http.get(f"/repositories/{name}")
            assert r.status_code == 200, r.text
            body: dict[str, Any] = r.json()
            if body["status"] != "cloning" and not body["pulling"]:
                return body
            await asyncio.sleep(0.1)


async def test_a_file_url_is_cloned_with_its_metadata_and_pulled_again(
    http: httpx.AsyncClient, gateway: GatewayServer, roots: Path
) -> None:
    upstream = roots / f"up-{uuid.uuid4().hex[:6]}"
    first = make_upstream(upstream, {"README.md": "hello\n", "app.py": "print(1)\n"})
    r = await http.post(
        "/repositories",
        json={"name": "app", "git_url": f"file://{upstream}", "description": "the app"},
    )
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "cloning" and r.json()["has_deploy_key"] is False
    repo = await settled(http, "app")
    assert repo["status"] == "ready", repo
    assert repo["head"]["commit"] == first and repo["head"]["branch"] == "main"
    assert repo["head"]["subject"] == "first commit" and repo["head"]["date"]
    assert repo["size_bytes"] > 0 and repo["error"] is None and repo["pulled_at"]
    clone = gateway.settings.repos_path / repo["id"] / "g1"
    assert (clone / "app.py").read_text() == "print(1)\n"
    assert git("rev-parse", "HEAD", cwd=clone) == first
    assert clone.stat().st_uid == 1000 and (clone / "app.py").stat().st_uid == 1000

    # Nothing new upstream: the pull keeps the generation.
    assert (await http.post("/repositories/app/pull")).status_code == 202
    same = await settled(http, "app")
    assert same["head"]["commit"] == first and same["error"] is None and clone.is_dir()

    (upstream / "app.py").write_text("print(2)\n")
    git("commit", "-q", "-am", "second commit", cwd=upstream)
    second = git("rev-parse", "HEAD", cwd=upstream)
    r = await http.post("/repositories/app/pull")
    assert r.status_code == 202, r.text
    assert r.json()["pulling"] is True
    pulled = await settled(http, "app")
    assert pulled["head"]["commit"] == second and pulled["head"]["subject"] == "second commit"
    # A moved head makes the next generation; the one before it is kept (a job may be making
    # its workspace on it), older ones used by no job are removed.
    assert (clone.with_name("g2") / "app.py").read_text() == "print(2)\n"
    assert git("rev-parse", "HEAD", cwd=clone.with_name("g2")) == second
    assert (clone / "app.py").read_text() == "print(1)\n"  # untouched by the pull
    (upstream / "app.py").write_text("print(3)\n")
    git("commit", "-q", "-am", "third commit", cwd=upstream)
    assert (await http.post("/repositories/app/pull")).status_code == 202
    await settled(http, "app")
    for _ in range(200):  # old generations are removed just after the pull is recorded
        if not clone.exists():
            break
        await asyncio.sleep(0.05)
    assert not clone.exists()
    assert (clone.with_name("g3") / "app.py").read_text() == "print(3)\n"
    assert pulled["pulled_at"] > repo["pulled_at"]
    listing = (await http.get("/repositories")).json()
    assert listing["total"] == 1 and [x["name"] for x in listing["repositories"]] == ["app"]
    metrics = (await http.get(f"{gateway.url}/metrics")).text
    assert 'ccgate_repo_operations_total{operation="clone",outcome="ok"}' in metrics
    assert 'ccgate_repo_operations_total{operation="pull",outcome="ok"}' in metrics
    assert 'ccgate_repo_operation_seconds_count{operation="clone"}' in metrics


async def test_a_broken_remote_fails_with_gits_reason_and_a_pull_clones_again(
    http: httpx.AsyncClient, roots: Path
) -> None:
    upstream = roots / f"later-{uuid.uuid4().hex[:6]}"
    upstream.mkdir()
    r = await http.post("/repositories", json={"name": "later", "git_url": f"file://{upstream}"})
    assert r.status_code == 202, r.text
    failed = await settled(http, "later")
    assert failed["status"] == "failed"
    assert "git clone failed" in failed["error"] and "not" in failed["error"]
    # The remote is fixed: a pull of a failed repository clones it again.
    upstream.rmdir()
    commit = make_upstream(upstream, {"x.txt": "x"})
    assert (await http.post("/repositories/later/pull")).status_code == 202
    fixed = await settled(http, "later")
    assert fixed["status"] == "ready" and fixed["head"]["commit"] == commit


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ext::sh%-c%touch%/tmp/pwned", "must be https://"),
        ("file:///etc", "outside the directories"),
        ("https://user:secret@example.org/r.git", "must not carry a password"),
        ("-u/evil", "not starting with '-'"),
        ("https:///nohost", "has no host"),
    ],
)
async def test_urls_the_gateway_must_not_clone_are_refused(
    http: httpx.AsyncClient, url: str, says: str
) -> None:
    r = await http.post("/repositories", json={"name": "bad", "git_url": url})
    assert r.status_code == 422, r.text
    assert says in r.text
    assert (await http.get("/repositories/bad")).status_code == 404


async def test_names_are_checked_unique_and_scoped_to_their_owner(
    http: httpx.AsyncClient, gateway: GatewayServer, roots: Path
) -> None:
    upstream = roots / f"mine-{uuid.uuid4().hex[:6]}"
    make_upstream(upstream, {"a": "a"})
    url = f"file://{upstream}"
    assert (
        await http.post("/repositories", json={"name": "../x", "git_url": url})
    ).status_code == 422
    assert (
        await http.post("/repositories", json={"name": "mine", "git_url": url})
    ).status_code == 202
    again = await http.post("/repositories", json={"name": "mine", "git_url": url})
    assert again.status_code == 409 and "already have" in again.text
    await settled(http, "mine")
    other = mint_token(key=JWT_SECRET, user="test-other", ttl_s=3600)
    headers = {"Authorization": f"Bearer {other}"}
    for method, path in (("GET", "/repositories/mine"), ("POST", "/repositories/mine/pull"),
                         ("DELETE", "/repositories/mine")):  # fmt: skip
        r = await http.request(method, path, headers=headers)
        assert r.status_code == 404, (method, path, r.text)
    session_token = mint_token(key=JWT_SECRET, user="x", ttl_s=60, session_scope="s-1")
    r = await http.get("/repositories", headers={"Authorization": f"Bearer {session_token}"})
    assert r.status_code == 403


async def test_the_size_limit_and_the_clone_timeout_fail_the_clone_and_leave_nothing(
    http: httpx.AsyncClient, gateway: GatewayServer, roots: Path, hanging_remote: str
) -> None:
    upstream = roots / f"big-{uuid.uuid4().hex[:6]}"
    make_upstream(upstream, {"blob.bin": os.urandom(3 * 1024 * 1024)})
    assert (
        await http.post("/repositories", json={"name": "big", "git_url": f"file://{upstream}"})
    ).status_code == 202
    big = await settled(http, "big")
    assert big["status"] == "failed" and "larger than 2097152 bytes" in big["error"], big
    failed = (await http.get(f"{gateway.url}/metrics")).text
    assert 'ccgate_repo_operations_total{operation="clone",outcome="failed"}' in failed
    assert not (gateway.settings.repos_path / big["id"]).exists()

    r = await http.post("/repositories", json={"name": "slow", "git_url": hanging_remote})
    assert r.status_code == 202, r.text
    # While it clones it cannot be deleted or pulled.
    assert (await http.delete("/repositories/slow")).status_code == 409
    assert (await http.post("/repositories/slow/pull")).status_code == 409
    slow = await settled(http, "slow")
    assert slow["status"] == "failed" and "timed out after 4s" in slow["error"], slow
    staging = [p.name for p in gateway.settings.repos_path.glob(f"{slow['id']}*")]
    assert staging == []


async def test_delete_removes_the_clone(
    http: httpx.AsyncClient, gateway: GatewayServer, roots: Path
) -> None:
    upstream = roots / f"gone-{uuid.uuid4().hex[:6]}"
    make_upstream(upstream, {"a": "a"})
    await http.post("/repositories", json={"name": "gone", "git_url": f"file://{upstream}"})
    repo = await settled(http, "gone")
    clone = gateway.settings.repos_path / repo["id"]
    assert clone.is_dir()
    assert (await http.delete("/repositories/gone")).status_code == 204
    assert not clone.exists()
    assert (await http.get("/repositories/gone")).status_code == 404
    assert (upstream / "a").read_text() == "a"  # the remote is untouched


async def test_a_clone_whose_replica_stopped_is_taken_over(
    gateway: GatewayServer, roots: Path
) -> None:
    """A row left ``cloning`` by a replica that stopped heartbeating (written as that replica
    would have left it) is claimed by this gateway's recovery loop and cloned."""
    upstream = roots / f"orphan-{uuid.uuid4().hex[:6]}"
    commit = make_upstream(upstream, {"a": "a"})
    engine = make_engine(gateway.settings.db_url)
    factory = make_db_factory(engine)
    repo_id = str(uuid.uuid4())
    async with factory() as db:
        db.add(Repository(id=repo_id, owner="test-orphan", name="orphan",
                          git_url=f"file://{upstream}", status=RepositoryStatus.CLONING,
                          worker="gw-gone", heartbeat_at=None))  # fmt: skip
        await db.commit()
    try:
        async with asyncio.timeout(30):
            while True:
                async with factory() as db:
                    row = await db.get(Repository, repo_id)
                    assert row is not None
                    if row.status is not RepositoryStatus.CLONING:
                        break
                await asyncio.sleep(0.2)
        assert row.status is RepositoryStatus.READY and row.head_commit == commit
        assert row.worker is None
    finally:
        await engine.dispose()


def test_the_repos_command_adds_lists_shows_pulls_and_removes(
    gateway: GatewayServer, roots: Path
) -> None:
    from click.testing import CliRunner

    from gateway.cli import main

    upstream = roots / f"cli-{uuid.uuid4().hex[:6]}"
    first = make_upstream(upstream, {"a": "a"})
    token = mint_token(key=JWT_SECRET, user=f"test-{uuid.uuid4().hex[:8]}", ttl_s=3600)
    env = {"CCGATE_URL": gateway.url, "CCGATE_TOKEN": token}
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(main, ["repos", *args], env=env)
        assert result.exit_code == 0, result.output
        return result.output

    added = run("add", "tool", f"file://{upstream}", "--description", "a tool")
    assert "tool  ready" in added and first[:12] in added and "first commit" in added
    assert "tool" in run("ls") and first[:12] in run("ls")
    (upstream / "a").write_text("b")
    git("commit", "-q", "-am", "second commit", cwd=upstream)
    assert "second commit" in run("pull", "tool")
    assert "second commit" in run("show", "tool")
    assert "removed tool" in run("rm", "tool")
    missing = runner.invoke(main, ["repos", "show", "tool"], env=env)
    assert missing.exit_code == 1 and "error 404" in missing.output
    refused = runner.invoke(main, ["repos", "add", "x", "ext::sh"], env=env)
    assert refused.exit_code == 1 and "error 422" in refused.output


async def test_the_database_down_during_a_clone_delays_its_outcome_and_loses_nothing(
    tmp_path: Path, roots: Path, redis_server: RedisContainer, hanging_remote: str
) -> None:
    """The database stops while a clone runs (against a remote that never answers, so it
    ends by its timeout while the database is down): the API answers 503 naming the
    database, the worker keeps its outcome and records it once the database is back."""
    own_pg = PostgresServer().start()
    gateway = GatewayServer(
        make_settings(
            tmp_path,
            redis_url=redis_server.url,
            database_url=own_pg.url,
            repo_allow_http=True,
            repo_clone_timeout_s=3,
        )
    ).start()
    token = mint_token(key=JWT_SECRET, user=f"test-{uuid.uuid4().hex[:8]}", ttl_s=3600)
    try:
        async with httpx.AsyncClient(
            base_url=f"{gateway.url}/api/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        ) as http:
            r = await http.post("/repositories", json={"name": "dark", "git_url": hanging_remote})
            assert r.status_code == 202, r.text
            await asyncio.to_thread(own_pg.halt)
            down = await http.get("/repositories/dark")
            assert down.status_code == 503 and "database" in down.json()["detail"], down.text
            await asyncio.sleep(4)  # the clone times out while the database is down
            await asyncio.to_thread(own_pg.resume)
            failed = await settled(http, "dark", timeout_s=60)
            assert failed["status"] == "failed" and "timed out after 3s" in failed["error"]
    finally:
        gateway.stop()
        own_pg.stop()
