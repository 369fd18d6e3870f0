"""Registered git repositories: register → clone in the background → ready | failed; pull on
demand or before a job (``git_aware``); delete. Clones live on the gateway's host as
*generations*, ``CCGATE_REPOS_DIR/<id>/g<N>``: job workspaces are overlays on a generation
(job_workspace.py), so a generation never changes once made. A pull that finds the remote's
head moved makes the next generation — hard links of the current one (git replaces a file by
unlinking it, so the links never carry a change back; git's own small files are real copies),
then fetch and reset there — and moves ``generation`` to it. Old generations are removed once
no job's workspace uses them (:meth:`RepositoryService.collect`).

Work (a clone or a pull) runs on the replica that accepted it, at most
``CCGATE_REPO_CONCURRENCY`` at once, each bounded by ``CCGATE_REPO_CLONE_TIMEOUT_S`` and, on
disk, by ``CCGATE_REPO_MAX_BYTES`` (watched while it runs). The row names its worker and a
heartbeat renewed every ``HEARTBEAT_S``; the supervised ``recover`` loop of any replica takes
over work whose heartbeat is older than ``STALE_S`` (its replica stopped or died) and runs it
again from the start. A clone or a new generation is made in a temporary directory and renamed
into place, so a generation is either complete or absent. Faults: git failing, timing out or
growing too large → ``failed`` with the reason (a pull's failure keeps the previous clone usable
and says why in ``error``); the database down → the API answers 503 and the worker retries its
final write until it succeeds or the process stops (then ``recover`` redoes the work).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
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
from gateway.db.models import Job, JobStatus, Repository, RepositoryStatus, utcnow
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
from gateway.services.job_workspace import own_by_session_user

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

    def path(self, repo_id: str) -> Path:
        """The repository's directory (its generations ``g<N>`` are in it)."""
        return self._settings.repos_path / repo_id

    def clone_path(self, repo: Repository) -> Path:
        """The current generation of the clone."""
        return self.path(repo.id) / f"g{repo.generation}"

    async def collect(self, repo_id: str) -> None:
        """Remove the generations of ``repo_id`` that are neither current, nor the one before
        it (a job may have read it from the row just before the pull moved on, and be making
        its workspace on it), nor under a job's workspace (all of them once the repository is
        deleted)."""
        async with self._db_factory() as db:
            repo = await db.get(Repository, repo_id)
            rows = await db.exec(select(Job.workspace).where(col(Job.repository_id) == repo_id))
            used = {str(w.get("lower")) for w in rows.all() if w}
        root = self.path(repo_id)
        keep = set(used)
        if repo is not None:
            keep |= {
                str(self.path(repo_id) / f"g{n}") for n in (repo.generation, repo.generation - 1)
            }
        try:
            names = [p for p in root.iterdir() if p.name.startswith("g") and "." not in p.name]
        except FileNotFoundError:
            return
        for generation in names:
            if str(generation) not in keep:
                await asyncio.to_thread(shutil.rmtree, generation, ignore_errors=True)
        if not keep & {str(p) for p in names}:
            await asyncio.to_thread(_remove_if_empty, root, repo is None)

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
        generation = repo.generation + 1
        target = self.path(repo.id) / f"g{generation}"
        staging = target.with_name(f"g{generation}.clone-{uuid.uuid4().hex[:8]}")
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
            await own_by_session_user(staging)
            await asyncio.to_thread(staging.rename, target)
        except GitFailed as exc:
            await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)
            await self.collect(repo.id)
            await self._finish(repo.id, {"status": RepositoryStatus.FAILED, "error": str(exc)})
            return False
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)
            raise
        now = utcnow()
        await self._finish(
            repo.id,
            {
                **meta,
                "status": RepositoryStatus.READY,
                "error": None,
                "pulled_at": now,
                "generation": generation,
            },
        )
        await self.collect(repo.id)
        return True

    async def _pull(self, repo: Repository) -> bool:
        """Fetch the branch; when its head moved, make the next generation at it."""
        current = self.clone_path(repo)
        branch = repo.branch or repo.head_branch or "HEAD"
        timeout_s = self._settings.repo_clone_timeout_s
        generation = repo.generation + 1
        target = current.with_name(f"g{generation}")
        staging = current.with_name(f"g{generation}.pull-{uuid.uuid4().hex[:8]}")
        try:
            remote = await run_git(
                ["ls-remote", "--", repo.git_url, branch],
                policy=self._policy,
                timeout_s=timeout_s,
                deploy_key=self._key(repo),
            )
            heads = remote.split()
            if heads and heads[0] == repo.head_commit and current.is_dir():
                await self._finish(
                    repo.id, {"pulling": False, "error": None, "pulled_at": utcnow()}
                )
                return True
            await asyncio.to_thread(snapshot, current, staging)
            await self._bounded(
                run_git(
                    ["fetch", "--no-tags", "--", repo.git_url, branch],
                    policy=self._policy,
                    timeout_s=timeout_s,
                    cwd=staging,
                    deploy_key=self._key(repo),
                ),
                staging,
            )
            await run_git(
                ["reset", "--hard", "FETCH_HEAD"],
                policy=self._policy,
                timeout_s=GIT_LOCAL_TIMEOUT_S,
                cwd=staging,
            )
            meta = await head_metadata(staging, self._policy)
            await own_by_session_user(staging)
            await asyncio.to_thread(shutil.rmtree, target, ignore_errors=True)
            await asyncio.to_thread(staging.rename, target)
        except GitFailed as exc:
            await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)
            await self._finish(repo.id, {"pulling": False, "error": f"pull failed: {exc}"})
            return False
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)
            raise
        await self._finish(
            repo.id,
            {
                **meta,
                "pulling": False,
                "error": None,
                "pulled_at": utcnow(),
                "generation": generation,
            },
        )
        await self.collect(repo.id)
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


def snapshot(source: Path, target: Path) -> None:
    """A new generation from ``source``: every file hard-linked (``cp -al``), then git's own
    files outside ``.git/objects`` (index, refs, logs, config — which git rewrites or appends
    to in place) replaced by real copies. Objects are immutable and git replaces work-tree
    files by unlinking them, so nothing done in ``target`` shows through in ``source``."""
    done = subprocess.run(
        ["cp", "-al", "--", str(source), str(target)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise GitFailed(f"cannot link the clone for the pull: {done.stderr.strip()[-300:]}")
    git_dir = target / ".git"
    for root, dirs, files in os.walk(git_dir):
        if Path(root) == git_dir and "objects" in dirs:
            dirs.remove("objects")
        for name in files:
            path = Path(root) / name
            if path.is_symlink() or not path.is_file():
                continue
            copy = path.with_name(f".{name}.ccgate-copy")
            shutil.copy2(path, copy)
            os.replace(copy, path)


def _remove_if_empty(root: Path, everything: bool) -> None:
    """Remove a repository's directory: all of it (``everything``: the repository is gone and
    no job uses a generation), or only when nothing is left in it."""
    if everything:
        shutil.rmtree(root, ignore_errors=True)
        return
    with contextlib.suppress(OSError):
        root.rmdir()
