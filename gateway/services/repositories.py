"""Registered git repositories: register → clone in the background → ready | failed; pull on
demand; delete. One clone per repository on the gateway's host (``CCGATE_REPOS_DIR/<id>``),
from which job workspaces are copied.

Work (a clone or a pull) runs on the replica that accepted it, at most
``CCGATE_REPO_CONCURRENCY`` at once, each bounded by ``CCGATE_REPO_CLONE_TIMEOUT_S`` and, on
disk, by ``CCGATE_REPO_MAX_BYTES`` (watched while it runs). The row names its worker and a
heartbeat renewed every ``HEARTBEAT_S``; the supervised ``recover`` loop of any replica takes
over work whose heartbeat is older than ``STALE_S`` (its replica stopped or died) and runs it
again from the start. A clone is made in a temporary directory and renamed into place, so the
clone directory is either complete or absent. Faults: git failing, timing out or growing too
large → ``failed`` with the reason (a pull's failure keeps the previous clone usable and says
why in ``error``); the database down → the API answers 503 and the worker retries its final
write until it succeeds or the process stops (then ``recover`` redoes the work).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
import uuid
from collections.abc import Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, or_, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.auth.secret_box import SecretBox, SecretUnreadable
from gateway.config import Settings
from gateway.db.models import Repository, RepositoryStatus, utcnow
from gateway.errors import Conflict, InvalidRequest
from gateway.metrics import Metrics
from gateway.services import owned
from gateway.services.git import (
    GIT_LOCAL_TIMEOUT_S,
    GitFailed,
    UrlPolicy,
    check_url,
    head_metadata,
    run_git,
    tree_size,
)

logger = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
STALE_S = 45.0
SIZE_CHECK_S = 2.0
RECOVER_INTERVAL_S = 15.0


class RepositoryService:
    """The repositories of every user; ``start_work``/``close`` own the background work."""

    def __init__(
        self,
        settings: Settings,
        db_factory: async_sessionmaker[AsyncSession],
        secret_box: SecretBox,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._db_factory = db_factory
        self._box = secret_box
        self._metrics = metrics
        self._policy = UrlPolicy(
            allow_http=settings.repo_allow_http, file_roots=tuple(settings.repo_file_roots)
        )
        self._slots = asyncio.Semaphore(settings.repo_concurrency)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.worker = f"gw-{uuid.uuid4().hex[:12]}"
        """This replica's name on the rows it works on."""

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
        """Remove the repository and its clone; Conflict while it is cloned or pulled."""
        repo = await self.get(db, owner=owner, name=name)
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
        await asyncio.to_thread(shutil.rmtree, self.path(repo.id), ignore_errors=True)

    def path(self, repo_id: str) -> Path:
        """The clone's directory."""
        return self._settings.repos_path / repo_id

    # --- background work ------------------------------------------------------------------

    async def recover(self) -> None:
        """Supervised loop: take over clones and pulls whose worker stopped heartbeating."""
        while True:
            try:
                await self._recover_once()
            except (SQLAlchemyError, ConnectionError, OSError) as exc:
                logger.warning("repositories: recovery skipped (database): %s", exc)
            await asyncio.sleep(RECOVER_INTERVAL_S)

    async def _recover_once(self) -> None:
        stale = utcnow() - timedelta(seconds=STALE_S)
        async with self._db_factory() as db:
            rows = await db.exec(
                select(Repository.id).where(
                    or_(
                        col(Repository.status) == RepositoryStatus.CLONING,
                        col(Repository.pulling).is_(True),
                    ),
                    or_(
                        col(Repository.heartbeat_at).is_(None), col(Repository.heartbeat_at) < stale
                    ),
                )
            )
            for repo_id in rows.all():
                taken = await db.exec(
                    update(Repository)
                    .where(
                        col(Repository.id) == repo_id,
                        or_(
                            col(Repository.heartbeat_at).is_(None),
                            col(Repository.heartbeat_at) < stale,
                        ),
                    )
                    .values(worker=self.worker, heartbeat_at=utcnow())
                )
                await db.commit()
                if taken.rowcount == 1:
                    logger.info("repositories: taking over the work on %s", repo_id)
                    self._start(repo_id)

    def _start(self, repo_id: str) -> None:
        if repo_id in self._tasks:
            return
        task = asyncio.create_task(self._work(repo_id), name=f"repo-{repo_id}")
        self._tasks[repo_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(repo_id, None))

    async def close(self) -> None:
        """Stop every clone and pull (their git is killed; another replica or the next start
        redoes them)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)

    async def _work(self, repo_id: str) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(repo_id), name=f"repo-hb-{repo_id}")
        try:
            async with self._slots:
                async with self._db_factory() as db:
                    repo = await db.get(Repository, repo_id)
                if repo is None:
                    return
                operation = "clone" if repo.status is RepositoryStatus.CLONING else "pull"
                if operation == "pull" and not repo.pulling:
                    return
                started = time.monotonic()
                ok = await (self._clone(repo) if operation == "clone" else self._pull(repo))
                self._metrics.repo_operations.labels(operation, "ok" if ok else "failed").inc()
                self._metrics.repo_operation_seconds.labels(operation).observe(
                    time.monotonic() - started
                )
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            logger.exception("repositories: work on %s failed (error id %s)", repo_id, error_id)
            await self._finish(
                repo_id,
                {
                    "status": RepositoryStatus.FAILED,
                    "pulling": False,
                    "error": f"internal error (error id {error_id})",
                },
            )
        finally:
            heartbeat.cancel()

    async def _heartbeat(self, repo_id: str) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            with contextlib.suppress(SQLAlchemyError, ConnectionError, OSError):
                async with self._db_factory() as db:
                    await db.exec(
                        update(Repository)
                        .where(col(Repository.id) == repo_id, col(Repository.worker) == self.worker)
                        .values(heartbeat_at=utcnow())
                    )
                    await db.commit()

    def _key(self, repo: Repository) -> str | None:
        if repo.deploy_key is None:
            return None
        try:
            return self._box.open(repo.deploy_key)
        except SecretUnreadable as exc:
            raise GitFailed(
                "the deploy key cannot be decrypted (the deployment's secret changed); "
                "register the repository again"
            ) from exc

    async def _clone(self, repo: Repository) -> bool:
        target = self.path(repo.id)
        staging = target.with_name(f"{repo.id}.clone-{uuid.uuid4().hex[:8]}")
        await asyncio.to_thread(shutil.rmtree, target, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        args = ["clone", "--single-branch", "--no-tags"]
        if repo.branch:
            args += ["--branch", repo.branch]
        try:
            await self._bounded(
                run_git(
                    [*args, "--", repo.git_url, str(staging)],
                    policy=self._policy,
                    timeout_s=self._settings.repo_clone_timeout_s,
                    deploy_key=self._key(repo),
                ),
                staging,
            )
            meta = await head_metadata(staging, self._policy)
            await asyncio.to_thread(staging.rename, target)
        except GitFailed as exc:
            await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)
            await self._finish(repo.id, {"status": RepositoryStatus.FAILED, "error": str(exc)})
            return False
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)
            raise
        now = utcnow()
        await self._finish(
            repo.id, {**meta, "status": RepositoryStatus.READY, "error": None, "pulled_at": now}
        )
        return True

    async def _pull(self, repo: Repository) -> bool:
        target = self.path(repo.id)
        branch = repo.branch or repo.head_branch or "HEAD"
        timeout_s = self._settings.repo_clone_timeout_s
        try:
            await self._bounded(
                run_git(
                    ["fetch", "--no-tags", "--", repo.git_url, branch],
                    policy=self._policy,
                    timeout_s=timeout_s,
                    cwd=target,
                    deploy_key=self._key(repo),
                ),
                target,
            )
            await run_git(
                ["reset", "--hard", "FETCH_HEAD"],
                policy=self._policy,
                timeout_s=GIT_LOCAL_TIMEOUT_S,
                cwd=target,
            )
            meta = await head_metadata(target, self._policy)
        except GitFailed as exc:
            await self._finish(repo.id, {"pulling": False, "error": f"pull failed: {exc}"})
            return False
        await self._finish(
            repo.id, {**meta, "pulling": False, "error": None, "pulled_at": utcnow()}
        )
        return True

    async def _bounded(self, command: Coroutine[Any, Any, str], directory: Path) -> None:
        """Run a git coroutine while watching ``directory``'s size; over the limit it is
        cancelled (git killed) and GitFailed raised."""
        limit = self._settings.repo_max_bytes
        git = asyncio.ensure_future(command)
        try:
            while True:
                done, _ = await asyncio.wait({git}, timeout=SIZE_CHECK_S)
                if done:
                    git.result()
                    break
                size = await asyncio.to_thread(tree_size, directory)
                if size > limit:
                    git.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await git
                    raise GitFailed(
                        f"the repository is larger than {limit} bytes (CCGATE_REPO_MAX_BYTES)"
                    )
        finally:
            if not git.done():
                git.cancel()
                with contextlib.suppress(asyncio.CancelledError, GitFailed):
                    await git
        size = await asyncio.to_thread(tree_size, directory)
        if size > limit:
            raise GitFailed(f"the repository is larger than {limit} bytes (CCGATE_REPO_MAX_BYTES)")

    async def _finish(self, repo_id: str, values: dict[str, object]) -> None:
        """Write the outcome if this replica still owns the work (retried while the database
        is down). Another replica may have taken it over meanwhile (this one's heartbeat
        could not be written): then its outcome stands and this one is dropped."""
        values = {**values, "worker": None, "heartbeat_at": None, "updated_at": utcnow()}
        delay = 0.5
        while True:
            try:
                async with self._db_factory() as db:
                    done = await db.exec(
                        update(Repository)
                        .where(col(Repository.id) == repo_id, col(Repository.worker) == self.worker)
                        .values(**values)
                    )
                    await db.commit()
                if done.rowcount != 1:
                    logger.warning("repositories: %s was taken over or deleted meanwhile", repo_id)
                return
            except (SQLAlchemyError, ConnectionError, OSError) as exc:
                logger.warning("repositories: cannot record %s yet: %s", repo_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
