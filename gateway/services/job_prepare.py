"""Before a job's session starts: pull its repository (``git_aware``), make its workspace
(job_workspace.py) from the clone, a git URL's shallow clone or nothing, and put its uploads in."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.config import Settings
from gateway.db.models import Job, JobStatus, Repository, RepositoryStatus
from gateway.metrics import Metrics
from gateway.services.git import GIT_LOCAL_TIMEOUT_S, GitFailed, UrlPolicy, run_git
from gateway.services.job_results import JobEnded
from gateway.services.job_workspace import JobWorkspaces, PreparedWorkspace
from gateway.services.repositories import RepositoryService
from gateway.services.zip_unpack import ZipRefused, unpack


class WorkspacePreparer:
    """Prepares jobs' workspaces; ``record(job_id, **columns)`` writes the job's row."""

    def __init__(
        self,
        settings: Settings,
        db_factory: async_sessionmaker[AsyncSession],
        workspaces: JobWorkspaces,
        repositories: RepositoryService,
        metrics: Metrics,
        record: Callable[..., Awaitable[None]],
    ) -> None:
        self._settings = settings
        self._db_factory = db_factory
        self._workspaces = workspaces
        self._repositories = repositories
        self._metrics = metrics
        self._update = record
        self._policy = UrlPolicy.of(settings)

    async def prepare(self, job: Job, deadline: float) -> PreparedWorkspace:
        """Pull (``git_aware``) and make the job's workspace with its uploads; records
        ``workspace``, ``git_commit`` and ``git_status``. ``deadline`` is monotonic time.
        Raises JobEnded (git_failed, or the repository unusable), WorkspaceFailed, or the
        engine's errors."""
        source = job.source
        kind = source.get("type", "empty")
        git: dict[str, Any] = {}
        began = time.monotonic()
        if kind == "repository":
            assert job.repository_id is not None
            repo = await self._repository(job, deadline)
            await self._update(job.id, status=JobStatus.RUNNING)
            began = time.monotonic()
            ws = await self._workspaces.from_clone(
                job.id, job.owner, self._repositories.clone_path(repo)
            )
            git["git_commit"] = repo.head_commit
        else:
            target, ws = await self._workspaces.directory(job.id, job.owner)
            if kind == "git":
                args = ["clone", "--depth", "1", "--single-branch", "--no-tags"]
                if source.get("ref"):
                    args += ["--branch", str(source["ref"])]
                try:
                    await run_git(
                        [*args, "--", str(source["url"]), str(target)],
                        policy=self._policy,
                        timeout_s=max(1.0, min(self._settings.repo_clone_timeout_s,
                                               deadline - time.monotonic())),
                    )  # fmt: skip
                    head = await run_git(
                        ["rev-parse", "HEAD"],
                        policy=self._policy,
                        timeout_s=GIT_LOCAL_TIMEOUT_S,
                        cwd=target,
                    )
                except GitFailed as exc:
                    raise JobEnded(status=JobStatus.GIT_FAILED, error=str(exc)) from exc
                git = {"git_commit": head.strip(), "git_status": f"cloned {source['url']}"}
            elif kind == "zip":
                try:
                    count, size = await asyncio.to_thread(
                        unpack,
                        self._workspaces.zip_path(job.id),
                        target,
                        max_bytes=self._settings.job_max_zip_bytes,
                    )
                except ZipRefused as exc:
                    raise JobEnded(status=JobStatus.FAILED, error=f"the zip: {exc}") from exc
                git = {"git_status": f"unpacked {count} files, {size} bytes"}
            await self._workspaces.finish_directory(job.id, job.owner, ws)
        await self._workspaces.add_uploads(job.id, ws)
        self._metrics.job_workspace_seconds.labels(ws.mode).observe(time.monotonic() - began)
        await self._update(job.id, workspace=ws.to_json(), **git)
        return ws

    async def _repository(self, job: Job, deadline: float) -> Repository:
        assert job.repository_id is not None
        if job.source.get("git_aware", True):
            async with self._db_factory() as db:
                before = await db.get(Repository, job.repository_id)
            try:
                repo = await self._repositories.pull_for_job(
                    job.repository_id,
                    timeout_s=max(1.0, min(self._settings.repo_clone_timeout_s,
                                           deadline - time.monotonic())),
                )  # fmt: skip
            except GitFailed as exc:
                raise JobEnded(status=JobStatus.GIT_FAILED, error=str(exc)) from exc
            moved = before is None or before.head_commit != repo.head_commit
            status = f"{'pulled to' if moved else 'up to date at'} {(repo.head_commit or '')[:12]}"
            await self._update(job.id, git_status=status)
            return repo
        async with self._db_factory() as db:
            found = await db.get(Repository, job.repository_id)
        if found is None or found.status is not RepositoryStatus.READY:
            state = "deleted" if found is None else found.status.value
            raise JobEnded(status=JobStatus.FAILED, error=f"the repository is {state}")
        return found
