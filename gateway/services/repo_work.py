"""The clones of registered repositories on disk and the work on them: clone and pull in the
background, heartbeats, taking over work a silent replica left, removing old generations.
(The API's operations are in repositories.py.)

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
import shutil
import time
import uuid
from collections.abc import Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.auth.secret_box import SecretBox, SecretUnreadable
from gateway.config import Settings
from gateway.db.models import Job, Repository, RepositoryStatus, utcnow
from gateway.metrics import Metrics
from gateway.services import repo_generations as generations
from gateway.services.git import (
    GIT_LOCAL_TIMEOUT_S,
    GitFailed,
    UrlPolicy,
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


class RepositoryWork:
    """Clones on disk and the background work on them (RepositoryService adds the API)."""

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
        self._policy = UrlPolicy.of(settings)
        self._slots = asyncio.Semaphore(settings.repo_concurrency)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.worker = f"gw-{uuid.uuid4().hex[:12]}"
        """This replica's name on the rows it works on."""

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
        deleted). Best effort: with the database down nothing is removed now (the next pull,
        job deletion or repository deletion collects again)."""
        try:
            async with self._db_factory() as db:
                repo = await db.get(Repository, repo_id)
                rows = await db.exec(select(Job.workspace).where(col(Job.repository_id) == repo_id))
                used = {str(w.get("lower")) for w in rows.all() if w}
        except (SQLAlchemyError, ConnectionError, OSError) as exc:
            logger.warning("repositories: generations of %s not collected now: %s", repo_id, exc)
            return
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
            await asyncio.to_thread(generations.remove_root, root, everything=repo is None)

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
                repo = await self._load(repo_id)
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

    async def _load(self, repo_id: str) -> Repository | None:
        """The row the work is about, read again until the database answers (an outage at
        the start of the work delays it; it does not fail it)."""
        delay = 0.5
        while True:
            try:
                async with self._db_factory() as db:
                    return await db.get(Repository, repo_id)
            except (SQLAlchemyError, ConnectionError, OSError) as exc:
                logger.warning("repositories: cannot read %s yet: %s", repo_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

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
            await self._index(staging, meta)
            await own_by_session_user(staging)
            await asyncio.to_thread(staging.rename, target)
        except GitFailed as exc:
            await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)
            # Nothing to collect but an empty directory (no database needed: it may be down).
            await asyncio.to_thread(generations.remove_root, self.path(repo.id), everything=False)
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
            await asyncio.to_thread(generations.snapshot, current, staging)
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
            await self._index(staging, meta)
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

    async def _index(self, directory: Path, meta: dict[str, object]) -> None:
        """The generation's code index, when the deployment builds them."""
        if self._settings.code_index_max_bytes > 0:
            commit = meta.get("head_commit")
            await asyncio.to_thread(
                generations.index_generation,
                directory,
                str(commit) if commit else None,
                self._settings.code_index_max_bytes,
            )

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
