"""Registered git repositories: register → clone in the background → ready | failed; pull on
demand or before a job (``git_aware``); delete. Clones live on the gateway's host as
*generations*, ``CCGATE_REPOS_DIR/<id>/g<N>``: job workspaces are overlays on a generation
(job_workspace.py), so a generation never changes once made. A pull that finds the remote's
head moved makes the next generation — hard links of the current one (git replaces a file by
unlinking it, so the links never carry a change back; git's own small files are real copies),
then fetch and reset there — and moves ``generation`` to it. Old generations are removed once
no job's workspace uses them. The work itself (clone, pull, take-over) is in repo_work.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db.models import Job, JobStatus, Repository, RepositoryStatus, utcnow
from gateway.errors import Conflict, InvalidRequest
from gateway.services import owned
from gateway.services.git import (
    GitFailed,
    check_url,
)
from gateway.services.repo_work import RepositoryWork

logger = logging.getLogger(__name__)


class RepositoryService(RepositoryWork):
    """The repositories of every user: the API's operations (the background work and the
    clones on disk: repo_work.py)."""

    # --- API ------------------------------------------------------------------------------

    async def register(
        self,
        db: AsyncSession,
        *,
        owner: str,
        name: str,
        git_url: str,
        branch: str | None,
        description: str | None,
        deploy_key: str | None,
    ) -> Repository:
        """Insert the repository (``cloning``) and start its clone. Raises InvalidRequest (a
        bad name, URL, branch or key) or Conflict (the owner has one of that name)."""
        owned.check_name(name)
        scheme = check_url(git_url, self._policy)
        if branch is not None and (not branch or branch.startswith("-") or ".." in branch):
            raise InvalidRequest(f"branch {branch!r} is not a valid branch name")
        if deploy_key is not None:
            if scheme != "ssh":
                raise InvalidRequest("a deploy_key is only used with ssh git URLs")
            if "PRIVATE KEY-----" not in deploy_key:
                raise InvalidRequest("deploy_key must be an SSH private key (PEM / OpenSSH)")
        repo = Repository(
            id=str(uuid.uuid4()),
            owner=owner,
            name=name,
            git_url=git_url,
            branch=branch,
            description=description,
            deploy_key=self._box.seal(deploy_key) if deploy_key is not None else None,
            worker=self.worker,
            heartbeat_at=utcnow(),
        )
        db.add(repo)
        try:
            await db.commit()
        except IntegrityError as exc:
            await db.rollback()
            raise Conflict(f"you already have a repository named {name!r}") from exc
        self._start(repo.id)
        return repo

    async def list(
        self, db: AsyncSession, *, owner: str, limit: int, offset: int
    ) -> tuple[list[Repository], int]:
        """The owner's repositories by name, one page, and how many there are."""
        return await owned.page(db, Repository, owner=owner, limit=limit, offset=offset)

    async def get(self, db: AsyncSession, *, owner: str, name: str) -> Repository:
        """The owner's repository called ``name``; NotFound otherwise (also for another's)."""
        return await owned.by_name(db, Repository, owner=owner, name=name, what="repository")

    async def pull(self, db: AsyncSession, *, owner: str, name: str) -> Repository:
        """Start a pull (a failed repository: a new clone). Conflict while one runs."""
        repo = await self.get(db, owner=owner, name=name)
        failed = repo.status is RepositoryStatus.FAILED
        values: dict[str, object] = {"worker": self.worker, "heartbeat_at": utcnow()}
        values.update(
            {"status": RepositoryStatus.CLONING, "error": None} if failed else {"pulling": True}
        )
        started = await db.exec(
            update(Repository)
            .where(
                col(Repository.id) == repo.id,
                col(Repository.status) != RepositoryStatus.CLONING,
                col(Repository.pulling).is_(False),
            )
            .values(**values)
        )
        await db.commit()
        if started.rowcount != 1:
            raise Conflict(f"repository {name!r} is being cloned or pulled; try again later")
        self._start(repo.id)
        await db.refresh(repo)
        return repo

    async def delete(self, db: AsyncSession, *, owner: str, name: str) -> None:
        """Remove the repository and its clones (a generation a finished job's workspace still
        uses stays until that job is deleted); Conflict while it is cloned or pulled, or while
        a job that is not finished uses it."""
        repo = await self.get(db, owner=owner, name=name)
        busy = (
            await db.exec(
                select(Job.id)
                .where(
                    col(Job.repository_id) == repo.id,
                    col(Job.status).in_(
                        [
                            JobStatus.CREATED,
                            JobStatus.QUEUED,
                            JobStatus.GIT_PULLING,
                            JobStatus.RUNNING,
                        ]
                    ),
                )
                .limit(1)
            )
        ).first()
        if busy is not None:
            raise Conflict(
                f"repository {name!r} is used by job {busy}, which is not finished; cancel or "
                "delete its jobs first"
            )
        gone = await db.exec(
            delete(Repository).where(
                col(Repository.id) == repo.id,
                col(Repository.status) != RepositoryStatus.CLONING,
                col(Repository.pulling).is_(False),
            )
        )
        await db.commit()
        if gone.rowcount != 1:
            raise Conflict(f"repository {name!r} is being cloned or pulled; try again later")
        await self.collect(repo.id)

    async def pull_for_job(self, repo_id: str, *, timeout_s: float) -> Repository:
        """``git_aware``: bring the clone to the remote's head before a job, and return the row
        after it. A pull already running (here or on another replica) is waited for instead of
        started twice; a clone in progress is waited for. Raises GitFailed (the pull failed,
        the repository failed or was deleted, or ``timeout_s`` passed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with self._db_factory() as db:
            started = await db.exec(
                update(Repository)
                .where(
                    col(Repository.id) == repo_id,
                    col(Repository.status) == RepositoryStatus.READY,
                    col(Repository.pulling).is_(False),
                )
                .values(pulling=True, worker=self.worker, heartbeat_at=utcnow())
            )
            await db.commit()
        if started.rowcount == 1:
            self._start(repo_id)
        while True:
            task = self._tasks.get(repo_id)
            if task is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), max(0.1, deadline - loop.time()))
            async with self._db_factory() as db:
                repo = await db.get(Repository, repo_id)
            if repo is None:
                raise GitFailed("the repository was deleted")
            if repo.status is RepositoryStatus.FAILED:
                raise GitFailed(repo.error or "the repository's clone failed")
            if repo.status is RepositoryStatus.READY and not repo.pulling:
                if started.rowcount == 1 and repo.error:
                    raise GitFailed(repo.error)
                return repo
            if loop.time() >= deadline:
                raise GitFailed(f"the repository was still being pulled after {timeout_s:.0f}s")
            await asyncio.sleep(0.5)
