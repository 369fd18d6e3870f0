"""The job queue: dispatch queued jobs fairly within the concurrency limits, and run each one —
pull (``git_aware``), workspace, session, result — to its final status.

Dispatch (every replica runs it, under a database lock): the next job in fair_queue order whose
user is under ``CCGATE_JOB_CONCURRENCY_PER_USER``, while fewer than ``CCGATE_JOB_CONCURRENCY``
run. The replica that takes a job runs it and heartbeats its row every ``HEARTBEAT_S``; any
replica's dispatcher takes over a job silent for ``STALE_S`` and continues it: it waits for the
turn already running, or prepares the job again when it had not reached its session.

A running job outlives a database outage: its runner keeps waiting for the turn (which goes on
in its container and is recorded by the ledger once the database is back) within its deadline.
The timeout is enforced here, outside the container: past ``started_at + timeout_s`` the job's
session is stopped (the CLI and container with it) and the job ends ``timeout``. A cancel is
seen within ``CHECK_S`` and stops the session the same way. A job whose session cannot be
admitted (session limits) waits for room inside its deadline; a dependency that fails (Docker,
git, the workspace) fails the job with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import zlib
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.config import Settings
from gateway.db.models import (
    Job,
    JobStatus,
    Session,
    Turn,
    as_utc,
    utcnow,
)
from gateway.errors import AdmissionRefused, DependencyUnavailable, GatewayError, TurnTimeout
from gateway.metrics import Metrics
from gateway.schemas import SessionConfig
from gateway.services.fair_queue import Queued, QueueState, next_to_run
from gateway.services.job_prepare import WorkspacePreparer
from gateway.services.job_results import JobEnded, costs, outcome, substitute
from gateway.services.job_workspace import (
    JobWorkspaces,
    PreparedWorkspace,
)
from gateway.services.repositories import RepositoryService
from gateway.services.sessions import SessionService

logger = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
STALE_S = 45.0
DISPATCH_INTERVAL_S = 2.0
RETENTION_SWEEP_S = 60.0
EXPIRE_BATCH = 100
CHECK_S = 2.0
"""How often a running job looks for a cancel and its deadline."""
_LOCK_KEY = zlib.crc32(b"ccgate-jobs")
_ACTIVE = [JobStatus.GIT_PULLING, JobStatus.RUNNING]
_DATABASE_DOWN = (SQLAlchemyError, ConnectionError, OSError, DependencyUnavailable)


async def load_queue(db: AsyncSession) -> QueueState:
    """The queued jobs, every user's running count, and the last start of every user with a
    job queued."""
    rows = await db.exec(
        select(Job.id, Job.owner, Job.queued_at).where(col(Job.status) == JobStatus.QUEUED)
    )
    queued = [Queued(i, o, as_utc(q) or utcnow()) for i, o, q in rows.all()]
    if not queued:
        return QueueState(queued)
    owners = {q.owner for q in queued}
    counts = await db.exec(
        select(Job.owner, func.count())
        .where(col(Job.status).in_(_ACTIVE))  # every user's: the total limit counts them all
        .group_by(col(Job.owner))
    )
    starts = await db.exec(
        select(Job.owner, func.max(Job.started_at))
        .where(col(Job.owner).in_(owners), col(Job.started_at).is_not(None))
        .group_by(col(Job.owner))
    )
    return QueueState(
        queued,
        running={owner: int(n) for owner, n in counts.all()},
        last_started={owner: as_utc(at) or utcnow() for owner, at in starts.all() if at},
    )


class JobQueue:
    """The dispatcher (``run``, supervised) and the runners of this replica's jobs."""

    def __init__(
        self,
        settings: Settings,
        db_factory: async_sessionmaker[AsyncSession],
        sessions: SessionService,
        workspaces: JobWorkspaces,
        repositories: RepositoryService,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._db_factory = db_factory
        self._sessions = sessions
        self._workspaces = workspaces
        self._repositories = repositories
        self._metrics = metrics
        self._preparer = WorkspacePreparer(
            settings, db_factory, workspaces, repositories, metrics, self._update
        )
        self._wake = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.worker = f"gw-{uuid.uuid4().hex[:12]}"

    def wake(self) -> None:
        """Dispatch now (a job was queued or finished, or a cancel was asked)."""
        self._wake.set()

    async def run(self) -> None:
        """Supervised loop: dispatch, take over jobs whose replica went silent, and remove the
        workspaces of jobs finished longer ago than the retention."""
        loop = asyncio.get_running_loop()
        recovered_at = swept_at = 0.0
        while True:
            try:
                if loop.time() - recovered_at >= STALE_S / 3:
                    recovered_at = loop.time()
                    await self._recover()
                if loop.time() - swept_at >= RETENTION_SWEEP_S:
                    swept_at = loop.time()
                    await self._expire_workspaces()
                await self._dispatch()
            except (SQLAlchemyError, ConnectionError, OSError) as exc:
                logger.warning("jobs: dispatch skipped (database): %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), DISPATCH_INTERVAL_S)
            self._wake.clear()

    async def close(self) -> None:
        """Stop this replica's runners; their jobs' sessions keep running and another replica
        (or this one, restarted) continues them once their heartbeat is stale."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)

    async def _dispatch(self) -> None:
        s = self._settings
        while True:
            async with self._db_factory() as db:
                if db.get_bind().dialect.name == "postgresql":
                    await db.exec(select(func.pg_advisory_xact_lock(_LOCK_KEY)))
                state = await load_queue(db)
                if not state.queued:
                    return
                pick = next_to_run(
                    state,
                    total_limit=s.job_concurrency,
                    per_user_limit=s.job_concurrency_per_user,
                )
                if pick is None:
                    return
                job = await db.get(Job, pick.job_id)
                assert job is not None
                pulls = job.source.get("type") == "repository" and job.source.get("git_aware")
                now = utcnow()
                await db.exec(
                    update(Job)
                    .where(col(Job.id) == job.id, col(Job.status) == JobStatus.QUEUED)
                    .values(
                        status=JobStatus.GIT_PULLING if pulls else JobStatus.RUNNING,
                        worker=self.worker,
                        heartbeat_at=now,
                        started_at=now,
                    )
                )
                await db.commit()
            self._metrics.job_queue_wait_seconds.observe((now - pick.queued_at).total_seconds())
            self._start(pick.job_id)

    async def _recover(self) -> None:
        stale = utcnow() - timedelta(seconds=STALE_S)
        async with self._db_factory() as db:
            rows = await db.exec(
                select(Job.id).where(
                    col(Job.status).in_(_ACTIVE),
                    or_(col(Job.heartbeat_at).is_(None), col(Job.heartbeat_at) < stale),
                )
            )
            for job_id in rows.all():
                taken = await db.exec(
                    update(Job)
                    .where(
                        col(Job.id) == job_id,
                        col(Job.status).in_(_ACTIVE),
                        or_(col(Job.heartbeat_at).is_(None), col(Job.heartbeat_at) < stale),
                    )
                    .values(worker=self.worker, heartbeat_at=utcnow())
                )
                await db.commit()
                if taken.rowcount == 1:
                    logger.info("jobs: taking over job %s from a silent replica", job_id)
                    self._start(job_id)

    async def _expire_workspaces(self) -> None:
        """Remove the workspace (volume, directory, uploads) of finished jobs older than
        ``CCGATE_JOB_WORKSPACE_RETENTION_S``, a batch at a time; the job and its result stay.
        A workspace the engine cannot remove now is retried at the next sweep."""
        retention = self._settings.job_workspace_retention_s
        if not retention:
            return
        cutoff = utcnow() - timedelta(seconds=retention)
        async with self._db_factory() as db:
            rows = await db.exec(
                select(Job)
                .where(
                    col(Job.status).in_([s for s in JobStatus if s.final]),
                    col(Job.finished_at) < cutoff,
                    col(Job.workspace_expired_at).is_(None),
                )
                .limit(EXPIRE_BATCH)
            )
            expired = list(rows.all())
        for job in expired:
            ws = PreparedWorkspace.from_json(job.workspace) if job.workspace else None
            try:
                await self._workspaces.remove(job.id, ws)
            except GatewayError as exc:
                logger.warning("jobs: workspace of %s not removed yet: %s", job.id, exc)
                continue
            await self._set(job.id, workspace=None, workspace_expired_at=utcnow())
            if job.repository_id is not None:
                await self._repositories.collect(job.repository_id)
            logger.info("jobs: workspace of %s removed (retention)", job.id)

    async def _set(self, job_id: str, **values: Any) -> None:
        async with self._db_factory() as db:
            await db.exec(update(Job).where(col(Job.id) == job_id).values(**values))
            await db.commit()

    def _start(self, job_id: str) -> None:
        if job_id in self._tasks:
            return
        task = asyncio.create_task(self._run(job_id), name=f"job-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(job_id, None))

    async def _run(self, job_id: str) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(job_id), name=f"job-hb-{job_id}")
        try:
            values = await self._execute(job_id)
        except JobEnded as final:
            values = final.values
        except GatewayError as exc:
            values = {"status": JobStatus.FAILED, "error": str(exc)}
        except (SQLAlchemyError, ConnectionError) as exc:
            logger.warning("jobs: job %s lost its database: %s", job_id, exc)
            values = {
                "status": JobStatus.FAILED,
                "error": f"the database was unavailable while the job ran: {exc}"[:2000],
            }
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            logger.exception("jobs: job %s failed (error id %s)", job_id, error_id)
            values = {"status": JobStatus.FAILED, "error": f"internal error (error id {error_id})"}
        finally:
            heartbeat.cancel()
        if values:
            await self._finish(job_id, values)
        self.wake()

    async def _heartbeat(self, job_id: str) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            with contextlib.suppress(SQLAlchemyError, ConnectionError, OSError):
                await self._update(job_id, heartbeat_at=utcnow())

    async def _update(self, job_id: str, **values: Any) -> None:
        async with self._db_factory() as db:
            await db.exec(
                update(Job)
                .where(col(Job.id) == job_id, col(Job.worker) == self.worker)
                .values(**values)
            )
            await db.commit()

    async def _load(self, job_id: str) -> Job | None:
        async with self._db_factory() as db:
            return await db.get(Job, job_id)

    # --- one job --------------------------------------------------------------------------

    async def _execute(self, job_id: str) -> dict[str, Any]:
        job = await self._load(job_id)
        if job is None or job.worker != self.worker or job.status.final:
            return {}
        started = as_utc(job.started_at) or utcnow()
        deadline = time.monotonic() + job.timeout_s - (utcnow() - started).total_seconds()
        if job.turn_id is None or job.session_id is None:
            if job.cancel_requested:
                return {"status": JobStatus.CANCELLED, "error": "cancelled before it ran"}
            ws = await self._preparer.prepare(job, deadline)
            session_id, turn_id = await self._launch(job, ws, deadline)
        else:
            session_id, turn_id = job.session_id, job.turn_id
        return await self._await_result(job, session_id, turn_id, deadline)

    async def _launch(self, job: Job, ws: PreparedWorkspace, deadline: float) -> tuple[str, str]:
        prompt = substitute(job.prompt, [f["name"] for f in job.files])
        config = SessionConfig.model_validate(job.options)
        while True:
            try:
                async with self._db_factory() as db:
                    session = await self._sessions.create_job_session(
                        db=db, owner=job.owner, job_id=job.id, config=config, prompt=prompt
                    )
                break
            except AdmissionRefused as exc:
                if time.monotonic() + CHECK_S >= deadline:
                    raise JobEnded(
                        status=JobStatus.TIMEOUT,
                        error=f"no room for its session before its timeout: {exc}",
                    ) from exc
                if await self._cancel_asked(job.id):
                    raise JobEnded(
                        status=JobStatus.CANCELLED, error="cancelled before it ran"
                    ) from None
                await asyncio.sleep(CHECK_S)
        turn = await self._sessions.latest_turn(session=session)
        await self._update(job.id, session_id=session.id, turn_id=turn.id)
        return session.id, turn.id

    async def _cancel_asked(self, job_id: str) -> bool:
        async with self._db_factory() as db:
            asked = (await db.exec(select(Job.cancel_requested).where(Job.id == job_id))).first()
        return bool(asked) or asked is None

    async def _await_result(
        self, job: Job, session_id: str, turn_id: str, deadline: float
    ) -> dict[str, Any]:
        ended: dict[str, Any] | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                ended = {
                    "status": JobStatus.TIMEOUT,
                    "error": f"ran past its timeout of {job.timeout_s}s; its session was stopped",
                }
                break
            try:
                turn = await self._sessions.wait_for_turn(
                    session_id=session_id, turn_id=turn_id, timeout_s=min(remaining, CHECK_S)
                )
                break
            except TurnTimeout:
                pass
            except _DATABASE_DOWN as exc:
                # The turn goes on in its container and the ledger records it once the
                # database is back: wait for that (within the job's deadline).
                logger.warning("jobs: job %s waits for the database: %s", job.id, exc)
                await asyncio.sleep(CHECK_S)
                continue
            try:
                cancelled = await self._cancel_asked(job.id)
            except _DATABASE_DOWN:
                continue
            if cancelled:
                ended = {"status": JobStatus.CANCELLED, "error": "cancelled while running"}
                break
        await self._stop_session(session_id)
        async with self._db_factory() as db:
            final_turn = await db.get(Turn, turn_id)
        values = costs(final_turn)
        if ended is not None:
            return {**values, **ended}
        return {**values, **outcome(turn, job.options.get("json_schema"))}

    async def _stop_session(self, session_id: str) -> None:
        async with self._db_factory() as db:
            session = await db.get(Session, session_id)
            if session is not None:
                await self._sessions.stop(db=db, session=session)

    async def _finish(self, job_id: str, values: dict[str, Any]) -> None:
        """Record the outcome if this replica still runs the job (retried while the database
        is down)."""
        values = {**values, "worker": None, "heartbeat_at": None, "finished_at": utcnow()}
        delay = 0.5
        while True:
            try:
                async with self._db_factory() as db:
                    done = await db.exec(
                        update(Job)
                        .where(col(Job.id) == job_id, col(Job.worker) == self.worker)
                        .values(**values)
                    )
                    await db.commit()
                if done.rowcount == 1:
                    self._metrics.jobs_finished.labels(str(values["status"])).inc()
                return
            except (SQLAlchemyError, ConnectionError, OSError) as exc:
                logger.warning("jobs: cannot record job %s yet: %s", job_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
