"""Batch jobs with the real CLI in real containers, real git and real uploads: a job on a
registered repository works in a copy-on-write clone and pulls first; a broken remote is
``git_failed``; uploaded files and ``{{name}}``; structured output against a JSON Schema; the
queue's limits, fairness and positions; cancel and timeout stop the container."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import docker
import pytest

from gateway.db.engine import make_db_factory, make_engine
from gateway.db.models import Job, JobStatus, utcnow
from gateway.services import job_queue
from scripted_model import ScriptedModelServer
from tests.conftest import Api, full_stack_settings
from tests.containers import PostgresContainer, RedisContainer, S3Container
from tests.integration.test_repositories import git, make_upstream
from tests.servers import GatewayServer, PostgresServer

pytestmark = pytest.mark.e2e

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63"
    "f8cfc0f01f0005000201a5f8a30d0000000049454e44ae426082"
)


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the test's upstream repositories live (the gateway's file-URL root)."""
    return Path(tmp_path_factory.mktemp("job-upstreams"))


@pytest.fixture(scope="module")
def jobs_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    roots: Path,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
    s3_server: S3Container,
    scripted_model: ScriptedModelServer,
    docker_client: docker.DockerClient,
) -> Iterator[GatewayServer]:
    """A gateway of its own (its own database) running at most 3 jobs, 2 per user; a runner
    silent for 5 s is taken over (heartbeats every second)."""
    patch = pytest.MonkeyPatch()
    patch.setattr(job_queue, "STALE_S", 5.0)
    patch.setattr(job_queue, "HEARTBEAT_S", 1.0)
    patch.setattr(job_queue, "RETENTION_SWEEP_S", 1.0)
    settings = full_stack_settings(
        Path(tmp_path_factory.mktemp("gw-jobs")),
        redis_server,
        postgres_server,
        s3_server,
        scripted_model,
        database_url=postgres_server.new_database(),
        repo_file_roots=[roots],
        job_concurrency=3,
        job_concurrency_per_user=2,
        job_max_file_bytes=1024 * 1024,
    )
    gateway = GatewayServer(settings).start()
    yield gateway
    gateway.stop()
    patch.undo()
    for volume in docker_client.volumes.list(filters={"label": "ccgate.job"}):
        if volume.attrs.get("Labels", {}).get("ccgate.deployment") == settings.deployment_id:
            volume.remove(force=True)


@pytest.fixture
async def make_user(jobs_gateway: GatewayServer) -> AsyncIterator[Any]:
    """Factory of users of the jobs gateway; their clients are closed after the test."""
    made: list[Api] = []

    def _make() -> Api:
        api = Api(jobs_gateway, f"test-{uuid.uuid4().hex[:8]}")
        made.append(api)
        return api

    yield _make
    for api in made:
        await api.http.aclose()


async def finished(api: Api, job_id: str, timeout_s: float = 90) -> dict[str, Any]:
    """The job once it is final."""
    final = {"completed", "failed", "git_failed", "timeout", "cancelled"}
    async with asyncio.timeout(timeout_s):
        while True:
            r = await api.http.get(f"/api/v1/jobs/{job_id}")
            assert r.status_code == 200, r.text
            job: dict[str, Any] = r.json()
            if job["status"] in final:
                return job
            await asyncio.sleep(0.2)


async def running(api: Api, job_id: str, timeout_s: float = 60) -> dict[str, Any]:
    """The job once its session runs its prompt."""
    async with asyncio.timeout(timeout_s):
        while True:
            job: dict[str, Any] = (await api.http.get(f"/api/v1/jobs/{job_id}")).json()
            if job["status"] == "running" and job["session_id"]:
                return job
            await asyncio.sleep(0.1)


async def registered(api: Api, name: str, upstream: Path) -> dict[str, Any]:
    r = await api.http.post(
        "/api/v1/repositories", json={"name": name, "git_url": f"file://{upstream}"}
    )
    assert r.status_code == 202, r.text
    async with asyncio.timeout(30):
        while True:
            repo: dict[str, Any] = (await api.http.get(f"/api/v1/repositories/{name}")).json()
            if repo["status"] != "cloning":
                assert repo["status"] == "ready", repo
                return repo
            await asyncio.sleep(0.1)


async def test_a_job_on_a_repository_changes_its_own_clone_and_pulls_first(
    make_user: Any, roots: Path, jobs_gateway: GatewayServer
) -> None:
    api: Api = make_user()
    upstream = roots / f"app-{uuid.uuid4().hex[:6]}"
    first = make_upstream(upstream, {"README.md": "hello\n", "app.py": "print(1)\n"})
    repo = await registered(api, "app", upstream)
    clone = jobs_gateway.settings.repos_path / repo["id"] / "g1"

    r = await api.http.post(
        "/api/v1/jobs",
        json={
            "prompt": "bash echo changed >> README.md && rm app.py && echo new > new.txt "
            "&& git status --short",
            "source": {"type": "repository", "repository": "app"},
            "tags": ["nightly", "a_b"],
        },
    )
    assert r.status_code == 201, r.text
    job = await finished(api, r.json()["id"])
    assert job["status"] == "completed", job
    assert job["workspace_mode"] in ("overlay", "copy")
    assert job["git_commit"] == first and job["git_status"] == f"up to date at {first[:12]}"
    # git in the workspace sees the job's changes, and nothing of the uploads directory.
    assert " M README.md" in job["result"] and " D app.py" in job["result"], job["result"]
    assert "?? new.txt" in job["result"] and ".ccgate" not in job["result"]
    assert job["cost_usd"] is not None and job["num_turns"] >= 1 and job["session_id"]
    # The registered clone is untouched.
    assert (clone / "README.md").read_text() == "hello\n" and (clone / "app.py").exists()
    # The workspace as the job left it, through the API.
    text = await api.http.get(
        f"/api/v1/jobs/{job['id']}/files/README.md", params={"format": "text"}
    )
    assert text.json()["content"] == "hello\nchanged\n", text.text
    listing = (await api.http.get(f"/api/v1/jobs/{job['id']}/files")).json()
    names = {e["name"]: e["kind"] for e in listing["entries"]}
    assert names.get("new.txt") == "file" and "app.py" not in names and names[".git"] == "dir"
    changes = (await api.http.get(f"/api/v1/jobs/{job['id']}/changes")).json()["changes"]
    if job["workspace_mode"] == "overlay":
        seen = {c["path"]: c["change"] for c in changes}
        assert seen["README.md"] == "modified" and seen["app.py"] == "deleted"
        assert seen["new.txt"] == "added"
    escape = await api.http.get(f"/api/v1/jobs/{job['id']}/files/..%2F..%2Fetc%2Fpasswd")
    assert escape.status_code in (404, 422), escape.text
    assert (await api.http.get(f"/api/v1/jobs/{job['id']}/files/nope.txt")).status_code == 404

    # A new upstream commit is pulled before the next job (git_aware, the default).
    (upstream / "app.py").write_text("print(2)\n")
    git("commit", "-q", "-am", "second", cwd=upstream)
    second = git("rev-parse", "HEAD", cwd=upstream)
    r = await api.http.post(
        "/api/v1/jobs",
        json={"prompt": "bash cat app.py", "source": {"type": "repository", "repository": "app"}},
    )
    job2 = await finished(api, r.json()["id"])
    assert job2["status"] == "completed", job2
    assert "print(2)" in job2["result"] and job2["git_commit"] == second
    assert job2["git_status"] == f"pulled to {second[:12]}"
    # The first job's workspace still reads its own generation.
    again = await api.http.get(
        f"/api/v1/jobs/{job['id']}/files/README.md", params={"format": "text"}
    )
    assert again.json()["content"] == "hello\nchanged\n"
    # Deleting the repository is refused while a job uses it only until it is finished.
    filtered = (await api.http.get("/api/v1/jobs", params={"tag": "a_b"})).json()
    assert [j["id"] for j in filtered["jobs"]] == [job["id"]]
    by_repo = (await api.http.get("/api/v1/jobs", params={"repository": "app"})).json()
    assert by_repo["total"] == 2
    assert (await api.http.delete(f"/api/v1/jobs/{job['id']}")).status_code == 204
    assert (await api.http.get(f"/api/v1/jobs/{job['id']}")).status_code == 404
    assert not (jobs_gateway.settings.jobs_path / job["id"]).exists()


async def test_a_broken_remote_makes_the_job_git_failed(make_user: Any, roots: Path) -> None:
    api: Api = make_user()
    upstream = roots / f"gone-{uuid.uuid4().hex[:6]}"
    make_upstream(upstream, {"x.txt": "x\n"})
    await registered(api, "gone", upstream)
    upstream.rename(upstream.with_name(upstream.name + "-moved"))
    r = await api.http.post(
        "/api/v1/jobs",
        json={"prompt": "bash ls", "source": {"type": "repository", "repository": "gone"}},
    )
    job = await finished(api, r.json()["id"])
    assert job["status"] == "git_failed", job
    assert "git ls-remote failed" in job["error"] and job["session_id"] is None


async def test_uploaded_files_are_in_the_workspace_and_named_in_the_prompt(make_user: Any) -> None:
    api: Api = make_user()
    r = await api.http.post(
        "/api/v1/jobs",
        json={
            "prompt": "bash echo PROMPT={{a.csv}} && cat {{a.csv}} && wc -c < {{pixel.png}}",
            "start": False,
        },
    )
    assert r.status_code == 201 and r.json()["status"] == "created", r.text
    job_id = r.json()["id"]
    files = [
        ("files", ("a.csv", b"id,name\n1,alpha\n", "text/csv")),
        ("files", ("pixel.png", PNG, "image/png")),
    ]
    up = await api.http.post(f"/api/v1/jobs/{job_id}/files", files=files)
    assert up.status_code == 200, up.text
    assert {f["name"]: f["size"] for f in up.json()["files"]} == {
        "a.csv": 16,
        "pixel.png": len(PNG),
    }
    bad = await api.http.post(
        f"/api/v1/jobs/{job_id}/files", files=[("files", ("../x", b"x", "text/plain"))]
    )
    assert bad.status_code == 422 and "plain name" in bad.text
    big = await api.http.post(
        f"/api/v1/jobs/{job_id}/files",
        files=[("files", ("big.bin", b"0" * (1024 * 1024 + 1), "application/octet-stream"))],
    )
    assert big.status_code == 413, big.text
    assert (await api.http.post(f"/api/v1/jobs/{job_id}/start")).status_code == 202
    assert (await api.http.post(f"/api/v1/jobs/{job_id}/start")).status_code == 409
    job = await finished(api, job_id)
    assert job["status"] == "completed", job
    assert "PROMPT=/workspace/.ccgate/uploads/a.csv" in job["result"]
    assert "1,alpha" in job["result"] and str(len(PNG)) in job["result"]
    assert [f["name"] for f in job["files"]] == ["a.csv", "pixel.png"]
    png = await api.http.get(f"/api/v1/jobs/{job_id}/files/.ccgate/uploads/pixel.png")
    assert png.status_code == 200 and png.content == PNG
    late = await api.http.post(
        f"/api/v1/jobs/{job_id}/files", files=[("files", ("late.txt", b"x", "text/plain"))]
    )
    assert late.status_code == 409


SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}, "why": {"type": "string"}},
    "required": ["answer"],
}


async def test_structured_output_is_parsed_and_checked_against_the_schema(make_user: Any) -> None:
    api: Api = make_user()
    r = await api.http.post(
        "/api/v1/jobs",
        json={"prompt": 'structured {"answer": 42, "why": "it is"}', "json_schema": SCHEMA},
    )
    assert r.status_code == 201, r.text
    job = await finished(api, r.json()["id"])
    assert job["status"] == "completed", (job["error"], job["result"])
    assert job["structured_output"] == {"answer": 42, "why": "it is"}
    invalid = await api.http.post(
        "/api/v1/jobs", json={"prompt": "x", "json_schema": {"type": "no-such-type"}}
    )
    assert invalid.status_code == 422 and "not a valid JSON Schema" in invalid.text


async def test_a_result_that_does_not_conform_fails_the_job_with_the_violation(
    make_user: Any,
) -> None:
    api: Api = make_user()
    # Without --json-schema the CLI returns the text as it is; the gateway still checks it.
    r = await api.http.post("/api/v1/jobs", json={"prompt": "echo not json", "json_schema": SCHEMA})
    job = await finished(api, r.json()["id"])
    assert job["status"] == "failed", job
    assert "json_schema" in job["error"], job["error"]


async def test_the_queue_holds_its_limits_is_fair_and_shows_positions(
    make_user: Any, jobs_gateway: GatewayServer, docker_client: docker.DockerClient
) -> None:
    alice: Api = make_user()
    bob: Api = make_user()
    ids: dict[str, str] = {}
    for _ in range(12):
        r = await alice.http.post("/api/v1/jobs", json={"prompt": "slow 1", "tags": ["q"]})
        assert r.status_code == 201, r.text
        ids[r.json()["id"]] = "alice"
    for _ in range(8):
        r = await bob.http.post("/api/v1/jobs", json={"prompt": "slow 1", "tags": ["q"]})
        ids[r.json()["id"]] = "bob"
    positions = [
        j["queue_position"]
        for api in (alice, bob)
        for j in (await api.http.get("/api/v1/jobs", params={"status": "queued"})).json()["jobs"]
    ]
    assert positions and len(set(positions)) == len(positions), positions
    # Per-user isolation: another user's job does not exist for bob.
    alices = next(i for i, who in ids.items() if who == "alice")
    for path in ("", "/files", "/changes", "/cancel"):
        method = "POST" if path == "/cancel" else "GET"
        seen = await bob.http.request(method, f"/api/v1/jobs/{alices}{path}")
        assert seen.status_code == 404, (path, seen.text)
    assert (await bob.http.delete(f"/api/v1/jobs/{alices}")).status_code == 404
    async with asyncio.timeout(240):
        while True:
            jobs = [
                j
                for api in (alice, bob)
                for j in (await api.http.get("/api/v1/jobs", params={"tag": "q"})).json()["jobs"]
            ]
            if all(j["status"] == "completed" for j in jobs):
                break
            await asyncio.sleep(0.2)
    # Never more than 3 at once: the gateway's own start and finish times of every job.
    moments = sorted(
        [(j["started_at"], 1) for j in jobs] + [(j["finished_at"], -1) for j in jobs],
        key=lambda m: (m[0], m[1]),
    )
    running = most = 0
    for _, step in moments:
        running += step
        most = max(most, running)
    assert most == 3, most
    started = {j["id"]: j["started_at"] for j in jobs}
    # Fair: while both have jobs queued, neither runs more than 2 jobs ahead of the other.
    order = [ids[j] for j in sorted(started, key=lambda i: started[i])]
    for k in range(1, 17):
        head = order[:k]
        assert abs(head.count("alice") - head.count("bob")) <= 2, order


async def test_cancel_and_timeout_stop_the_running_container(
    make_user: Any, docker_client: docker.DockerClient
) -> None:
    api: Api = make_user()
    r = await api.http.post("/api/v1/jobs", json={"prompt": "slow 60"})
    job_id = r.json()["id"]
    job = await running(api, job_id)
    sid = job["session_id"]
    assert docker_client.containers.get(f"ccgate-{sid}").status == "running"
    began = time.monotonic()
    assert (await api.http.post(f"/api/v1/jobs/{job_id}/cancel")).status_code == 202
    cancelled = await finished(api, job_id, timeout_s=30)
    assert cancelled["status"] == "cancelled", cancelled
    assert time.monotonic() - began < 20
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(f"ccgate-{sid}")

    r = await api.http.post("/api/v1/jobs", json={"prompt": "slow 60", "timeout_s": 4})
    timed = await finished(api, r.json()["id"], timeout_s=60)
    assert timed["status"] == "timeout" and "timeout of 4s" in timed["error"], timed
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(f"ccgate-{timed['session_id']}")


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


async def test_a_job_runs_on_a_zip_or_a_git_url(make_user: Any, roots: Path) -> None:
    api: Api = make_user()
    refused = await api.http.post(
        "/api/v1/jobs", json={"prompt": "bash ls", "source": {"type": "zip"}}
    )
    assert refused.status_code == 422 and "start: false" in refused.text
    r = await api.http.post(
        "/api/v1/jobs",
        json={"prompt": "bash cat dir/a.txt", "source": {"type": "zip"}, "start": False},
    )
    job_id = r.json()["id"]
    assert (await api.http.post(f"/api/v1/jobs/{job_id}/start")).status_code == 409
    archive = _zip_bytes({"dir/a.txt": b"from the zip\n"})
    up = await api.http.put(
        f"/api/v1/jobs/{job_id}/workspace", files={"file": ("w.zip", archive, "application/zip")}
    )
    assert up.status_code == 200, up.text
    assert (await api.http.post(f"/api/v1/jobs/{job_id}/start")).status_code == 202
    job = await finished(api, job_id)
    assert job["status"] == "completed" and "from the zip" in job["result"], job
    assert job["git_status"] == "unpacked 1 files, 13 bytes"

    evil = await api.http.post(
        "/api/v1/jobs", json={"prompt": "bash ls", "source": {"type": "zip"}, "start": False}
    )
    evil_id = evil.json()["id"]
    bad = _zip_bytes({"../../escape.txt": b"x"})
    await api.http.put(
        f"/api/v1/jobs/{evil_id}/workspace", files={"file": ("e.zip", bad, "application/zip")}
    )
    await api.http.post(f"/api/v1/jobs/{evil_id}/start")
    failed = await finished(api, evil_id)
    assert failed["status"] == "failed" and "leaves the workspace" in failed["error"], failed
    assert failed["session_id"] is None

    upstream = roots / f"url-{uuid.uuid4().hex[:6]}"
    make_upstream(upstream, {"hello.txt": "by url\n"})
    git("checkout", "-q", "-b", "feature", cwd=upstream)
    (upstream / "hello.txt").write_text("on the feature branch\n")
    git("commit", "-q", "-am", "feature", cwd=upstream)
    feature = git("rev-parse", "HEAD", cwd=upstream)
    r = await api.http.post(
        "/api/v1/jobs",
        json={
            "prompt": "bash cat hello.txt",
            "source": {"type": "git", "url": f"file://{upstream}", "ref": "feature"},
        },
    )
    job = await finished(api, r.json()["id"])
    assert job["status"] == "completed" and "on the feature branch" in job["result"], job
    assert job["git_commit"] == feature
    outside = await api.http.post(
        "/api/v1/jobs",
        json={"prompt": "x", "source": {"type": "git", "url": "file:///etc"}},
    )
    assert outside.status_code == 422 and "outside the directories" in outside.text


async def test_claude_code_ops_task_shapes_are_accepted_on_api_tasks(make_user: Any) -> None:
    api: Api = make_user()
    r = await api.http.post(
        "/api/tasks",
        json={
            "prompt": 'structured {"answer": 7}',
            "apiKey": "sk-ant-not-used",
            "mode": "process",
            "schema": SCHEMA,
            "timeout": 60000,
            "permissionMode": "acceptEdits",
            "mcpServers": {"inline": {}, "profiles": []},
            "tags": {"project": "demo"},
        },
    )
    assert r.status_code == 201, r.text
    task = r.json()
    assert task["status"] == "queued" and task["tags"] == {"project": "demo"}
    async with asyncio.timeout(90):
        while task["status"] in ("queued", "running"):
            await asyncio.sleep(0.2)
            task = (await api.http.get(f"/api/tasks/{task['id']}")).json()
    assert task["status"] == "completed", task
    assert task["result"]["data"] == {"answer": 7} and task["error"] is None
    assert task["completedAt"] and task["sessionId"]
    job = (await api.http.get(f"/api/v1/jobs/{task['id']}")).json()
    assert job["timeout_s"] == 60 and job["options"]["permission_mode"] == "acceptEdits"
    assert "sk-ant-not-used" not in str(job)
    done = (await api.http.get("/api/tasks", params={"status": "completed"})).json()
    assert [t["id"] for t in done] == [task["id"]]
    assert (await api.http.get("/api/tasks", params={"status": "running"})).json() == []

    r = await api.http.post(
        "/api/tasks",
        json={"prompt": "bash echo made > out.txt && cat data.txt", "files": {"type": "zip"}},
    )
    zipped = r.json()
    assert zipped["status"] == "queued"
    up = await api.http.put(
        f"/api/tasks/{zipped['id']}/workspace",
        files={"file": ("w.zip", _zip_bytes({"data.txt": b"zipped data\n"}), "application/zip")},
    )
    assert up.status_code == 200, up.text
    async with asyncio.timeout(90):
        while zipped["status"] in ("queued", "running"):
            await asyncio.sleep(0.2)
            zipped = (await api.http.get(f"/api/tasks/{zipped['id']}")).json()
    assert zipped["status"] == "completed" and "zipped data" in zipped["result"]["text"], zipped
    artifacts = (await api.http.get(f"/api/tasks/{zipped['id']}/artifacts")).json()
    assert {"path": "out.txt", "size": 5} in artifacts, artifacts
    out = await api.http.get(f"/api/tasks/{zipped['id']}/artifacts/out.txt")
    assert out.content == b"made\n"
    bad_tag = await api.http.post("/api/tasks", json={"prompt": "x", "tags": {"a b": "c"}})
    assert bad_tag.status_code == 422 and "tags" in bad_tag.text
    r = await api.http.post("/api/tasks", json={"prompt": "slow 60"})
    cancelled = (await api.http.delete(f"/api/tasks/{r.json()['id']}")).json()
    assert cancelled["status"] in ("cancelled", "running", "queued")
    async with asyncio.timeout(60):
        while cancelled["status"] != "cancelled":
            await asyncio.sleep(0.2)
            cancelled = (await api.http.get(f"/api/tasks/{r.json()['id']}")).json()


def test_the_run_and_jobs_commands(jobs_gateway: GatewayServer, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from gateway.auth import mint_token
    from gateway.cli import main

    token = mint_token(
        key=jobs_gateway.app.state.jwt_key, user=f"test-{uuid.uuid4().hex[:8]}", ttl_s=3600
    )
    env = {"CCGATE_URL": jobs_gateway.url, "CCGATE_TOKEN": token}
    runner = CliRunner()
    (tmp_path / "notes.txt").write_text("cli upload\n")
    (tmp_path / "schema.json").write_text('{"type": "object", "required": ["k"]}')
    result = runner.invoke(
        main,
        ["run", "-p", "bash cat {{notes.txt}} && echo > made.txt", "--file",
         str(tmp_path / "notes.txt"), "--tag", "cli", "--wait"],
        env=env,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "→ Bash" in result.output and "cli upload" in result.output, result.output
    job_id = result.output.split()[0]
    structured = runner.invoke(
        main,
        ["run", "-p", 'structured {"k": "v"}', "--schema", str(tmp_path / "schema.json"),
         "--wait"],
        env=env,
    )  # fmt: skip
    assert structured.exit_code == 0 and '"k": "v"' in structured.output, structured.output
    listed = runner.invoke(main, ["jobs", "ls", "--tag", "cli"], env=env)
    assert listed.exit_code == 0 and job_id in listed.output and "completed" in listed.output
    files = runner.invoke(main, ["jobs", "files", job_id], env=env)
    assert "made.txt" in files.output and ".ccgate" in files.output, files.output
    got = runner.invoke(main, ["jobs", "get", job_id, ".ccgate/uploads/notes.txt"], env=env)
    assert got.output == "cli upload\n"
    assert "completed" in runner.invoke(main, ["jobs", "show", job_id], env=env).output
    assert runner.invoke(main, ["jobs", "rm", job_id], env=env).exit_code == 0
    gone = runner.invoke(main, ["jobs", "show", job_id], env=env)
    assert gone.exit_code == 1 and "error 404" in gone.output


async def test_a_replica_stopping_mid_job_leaves_it_to_another_that_finishes_it(
    jobs_gateway: GatewayServer,
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
    s3_server: S3Container,
    scripted_model: ScriptedModelServer,
) -> None:
    """Replica A runs a job and stops while its turn runs; replica B (same database) takes the
    job over once A's heartbeat is 5 s old, waits for the turn and records the result. A job
    row left before its session by a vanished replica is prepared and run again by B."""

    def replica(name: str, database_url: str, port: int | None = None) -> GatewayServer:
        settings = full_stack_settings(
            Path(tmp_path_factory.mktemp(name)), redis_server, postgres_server, s3_server,
            scripted_model, database_url=database_url, deployment="jobs-takeover",
        )  # fmt: skip
        return GatewayServer(settings, port=port).start()

    database_url = postgres_server.new_database()
    first = replica("gw-a", database_url)
    api = Api(first, f"test-{uuid.uuid4().hex[:8]}")
    second: GatewayServer | None = None
    try:
        r = await api.http.post("/api/v1/jobs", json={"prompt": "slow 6"})
        job_id = r.json()["id"]
        job = await running(api, job_id)
        await api.http.aclose()
        first.stop()  # its runner is cancelled; the job's session keeps running
        # B replaces A at its address (where the job's container calls the model proxy).
        second = replica("gw-b", database_url, port=first.port)
        api = Api(second, api.user)
        engine = make_engine(second.settings.db_url)
        try:
            orphan = str(uuid.uuid4())
            async with make_db_factory(engine)() as db:
                db.add(Job(id=orphan, owner=api.user, status=JobStatus.RUNNING,
                           prompt="taken over", source={"type": "empty"}, options={},
                           timeout_s=120, worker="gw-gone", heartbeat_at=None,
                           started_at=utcnow(), queued_at=utcnow()))  # fmt: skip
                await db.commit()
            done = await finished(api, job_id, timeout_s=90)
            assert done["status"] == "completed" and done["session_id"] == job["session_id"], done
            again = await finished(api, orphan, timeout_s=90)
            assert again["status"] == "completed" and again["result"] == "Echo: taken over"
        finally:
            await engine.dispose()
    finally:
        await api.http.aclose()
        if second is not None:
            second.stop()


async def test_the_code_search_profile_gives_the_agent_an_index_of_the_repository(
    make_user: Any, roots: Path, jobs_gateway: GatewayServer
) -> None:
    api: Api = make_user()
    upstream = roots / f"search-{uuid.uuid4().hex[:6]}"
    head = make_upstream(
        upstream,
        {"app.py": "def needle_function():\n    return 1\n", "other.py": "x = 2\n"},
    )
    repo = await registered(api, "searchable", upstream)
    generation = jobs_gateway.settings.repos_path / repo["id"] / "g1"
    assert (generation / ".git" / "ccgate-index.sqlite").is_file()  # built once per commit
    source = {"type": "repository", "repository": "searchable"}
    r = await api.http.post(
        "/api/v1/jobs",
        json={
            "prompt": 'tool mcp__code-search__search_code {"query": "needle_function"}',
            "source": source,
            "mcp_profiles": ["code-search"],
        },
    )
    assert r.status_code == 201, r.text
    job = await finished(api, r.json()["id"])
    assert job["status"] == "completed", job
    assert "app.py" in job["result"] and "1: def needle_function():" in job["result"], job
    assert "other.py" not in job["result"]
    r = await api.http.post(
        "/api/v1/jobs",
        json={
            "prompt": "tool mcp__code-search__index_status {}",
            "source": source,
            "mcp_profiles": ["code-search"],
        },
    )
    status = await finished(api, r.json()["id"])
    assert f'"commit": "{head}"' in status["result"], status


async def test_a_finished_jobs_workspace_is_removed_after_the_retention(
    make_user: Any, jobs_gateway: GatewayServer, docker_client: docker.DockerClient
) -> None:
    api: Api = make_user()
    r = await api.http.post("/api/v1/jobs", json={"prompt": "write kept.txt data"})
    job = await finished(api, r.json()["id"])
    assert job["status"] == "completed" and job["workspace_expired_at"] is None
    assert (await api.http.get(f"/api/v1/jobs/{job['id']}/files/kept.txt")).status_code == 200
    engine = make_engine(jobs_gateway.settings.db_url)
    try:
        async with make_db_factory(engine)() as db:
            row = await db.get(Job, job["id"])
            assert row is not None
            row.finished_at = utcnow() - timedelta(days=8)  # past the 7-day default
            db.add(row)
            await db.commit()
    finally:
        await engine.dispose()
    async with asyncio.timeout(30):
        while True:
            expired = (await api.http.get(f"/api/v1/jobs/{job['id']}")).json()
            if expired["workspace_expired_at"] is not None:
                break
            await asyncio.sleep(0.2)
    assert expired["status"] == "completed" and expired["result"] == job["result"]
    gone = await api.http.get(f"/api/v1/jobs/{job['id']}/files/kept.txt")
    assert gone.status_code == 409 and "RETENTION" in gone.text, gone.text
    assert not (jobs_gateway.settings.jobs_path / job["id"]).exists()
    with pytest.raises(docker.errors.NotFound):
        docker_client.volumes.get(f"ccgate-job-{job['id']}")
    assert (await api.http.delete(f"/api/v1/jobs/{job['id']}")).status_code == 204


async def test_a_running_job_outlives_a_database_outage(
    tmp_path_factory: pytest.TempPathFactory,
    jobs_gateway: GatewayServer,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
    s3_server: S3Container,
    scripted_model: ScriptedModelServer,
) -> None:
    """The database stops for a few seconds while a job's turn runs: the API answers 503, the
    turn goes on in its container, and once the database is back the ledger records it and
    the job completes with its result."""
    own_pg = PostgresServer().start()
    settings = full_stack_settings(
        Path(tmp_path_factory.mktemp("gw-nodb")), redis_server, postgres_server, s3_server,
        scripted_model, database_url=own_pg.url,
    )  # fmt: skip
    gateway = GatewayServer(settings).start()
    api = Api(gateway, f"test-{uuid.uuid4().hex[:8]}")
    try:
        r = await api.http.post("/api/v1/jobs", json={"prompt": "slow 3"})
        job_id = r.json()["id"]
        await running(api, job_id)
        await asyncio.to_thread(own_pg.halt)
        down = await api.http.get(f"/api/v1/jobs/{job_id}")
        assert down.status_code == 503 and "database" in down.json()["detail"], down.text
        await asyncio.sleep(4)  # the turn ends while the database is down
        await asyncio.to_thread(own_pg.resume)
        done = await finished(api, job_id, timeout_s=90)
        assert done["status"] == "completed", done
    finally:
        await api.http.aclose()
        gateway.stop()
        own_pg.stop()
