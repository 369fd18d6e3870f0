"""Jobs: create, upload files, start, read, list, cancel, delete, and read their workspaces.
Running them is the queue's work (job_queue.py).

Every operation is scoped to the job's owner (another user's job is NotFound). Uploads are
streamed to ``CCGATE_JOBS_DIR/<job>/uploads`` under the size and count limits; a name is kept
as given when it is a plain file name (no path, no leading dot, at most 255 bytes) and refused
otherwise, so that ``{{name}}`` in the prompt means exactly that file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from sqlalchemy import func, update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.config import Settings
from gateway.db.models import Job, JobStatus, McpProfile, Repository, Session, utcnow
from gateway.errors import AdmissionRefused, Conflict, InvalidRequest, NotFound, RequestTooLarge
from gateway.job_schemas import GitSource, JobCreate, RepositorySource, ZipSource
from gateway.services import workspace_files
from gateway.services.fair_queue import fair_order
from gateway.services.git import UrlPolicy, check_url
from gateway.services.job_queue import load_queue
from gateway.services.job_workspace import JobWorkspaces, PreparedWorkspace
from gateway.services.mcp_profiles import BUILTIN_PROFILES
from gateway.services.repositories import RepositoryService
from gateway.services.sessions import SessionService

_FILE_NAME = re.compile(r"^[^/\\\x00-\x1f.][^/\\\x00-\x1f]{0,254}$")
_CHUNK = 256 * 1024
_PENDING = (JobStatus.QUEUED,)


class Upload(Protocol):
    """An uploaded file being received (FastAPI's UploadFile is one)."""

    filename: str | None

    async def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes; b"" at the end."""
        ...


class JobService:
    """The API's operations on jobs."""

    def __init__(
        self,
        settings: Settings,
        workspaces: JobWorkspaces,
        repositories: RepositoryService,
        sessions: SessionService,
        wake_queue: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._workspaces = workspaces
        self._repositories = repositories
        self._sessions = sessions
        self._wake = wake_queue
        self._policy = UrlPolicy.of(settings)

    async def create(self, db: AsyncSession, *, owner: str, body: JobCreate) -> Job:
        """Insert the job, ``queued`` (``start``) or ``created``. Raises InvalidRequest (an
        unknown repository or MCP profile, a refused git URL, a timeout over the maximum) or
        AdmissionRefused (the queue is full)."""
        s = self._settings
        timeout_s = body.timeout_s or s.job_timeout_s
        if timeout_s > s.job_max_timeout_s:
            raise InvalidRequest(
                f"timeout_s {timeout_s} is over the maximum of {s.job_max_timeout_s} "
                "(CCGATE_JOB_MAX_TIMEOUT_S)"
            )
        repository_id = None
        source = body.source
        if isinstance(source, RepositorySource):
            repo = (
                await db.exec(
                    select(Repository).where(
                        Repository.owner == owner, Repository.name == source.repository
                    )
                )
            ).first()
            if repo is None:
                raise InvalidRequest(f"you have no repository named {source.repository!r}")
            repository_id = repo.id
        elif isinstance(source, GitSource):
            check_url(source.url, self._policy)
            if source.ref is not None and (source.ref.startswith("-") or ".." in source.ref):
                raise InvalidRequest(f"ref {source.ref!r} is not a valid branch or tag name")
        elif isinstance(source, ZipSource) and body.start:
            raise InvalidRequest(
                "a zip job starts once its zip is uploaded: create it with start: false, "
                "PUT /api/v1/jobs/{id}/workspace, then POST /api/v1/jobs/{id}/start"
            )
        if body.mcp_profiles:
            found = set(
                (
                    await db.exec(
                        select(McpProfile.name).where(
                            McpProfile.owner == owner, col(McpProfile.name).in_(body.mcp_profiles)
                        )
                    )
                ).all()
            )
            missing = [n for n in body.mcp_profiles if n not in found | BUILTIN_PROFILES.keys()]
            if missing:
                raise InvalidRequest(f"you have no MCP profile named {missing[0]!r}")
        if body.start:
            await self._check_room(db)
        now = utcnow()
        job = Job(
            id=str(uuid.uuid4()),
            owner=owner,
            status=JobStatus.QUEUED if body.start else JobStatus.CREATED,
            prompt=body.prompt,
            source=source.model_dump(mode="json"),
            repository_id=repository_id,
            options=body.session_config().model_dump(mode="json", exclude_defaults=True),
            tags="," + "".join(f"{t}," for t in dict.fromkeys(body.tags)),
            timeout_s=timeout_s,
            queued_at=now if body.start else None,
        )
        db.add(job)
        await db.commit()
        if body.start:
            self._wake()
        return job

    async def _check_room(self, db: AsyncSession) -> None:
        queued = (
            await db.exec(
                select(func.count()).select_from(Job).where(col(Job.status) == JobStatus.QUEUED)
            )
        ).one()
        if queued >= self._settings.job_max_queued:
            raise AdmissionRefused(
                f"the job queue is full ({queued} jobs; CCGATE_JOB_MAX_QUEUED); retry later",
                limit="job_max_queued",
                retry_after_s=30,
            )

    async def get(self, db: AsyncSession, *, owner: str, job_id: str) -> Job:
        """The owner's job; NotFound otherwise (also another user's)."""
        job = await db.get(Job, job_id)
        if job is None or job.owner != owner:
            raise NotFound(f"job {job_id} not found")
        return job

    async def positions(self, db: AsyncSession) -> dict[str, int]:
        """Queue position (1 = next) of every queued job, in the dispatcher's fair order."""
        state = await load_queue(db)
        return {q.job_id: n for n, q in enumerate(fair_order(state), start=1)}

    async def list_jobs(
        self,
        db: AsyncSession,
        *,
        owner: str,
        status: JobStatus | None,
        tag: str | None,
        repository: str | None,
        limit: int,
        offset: int,
        statuses: list[JobStatus] | None = None,
    ) -> tuple[list[Job], int]:
        """A page of the owner's jobs, newest first, filtered by status (or any of
        ``statuses``), one tag and a repository name; and how many match."""
        where = [col(Job.owner) == owner]
        if status is not None:
            where.append(col(Job.status) == status)
        if statuses is not None:
            where.append(col(Job.status).in_(statuses))
        if tag is not None:
            where.append(col(Job.tags).contains(f",{tag},", autoescape=True))
        if repository is not None:
            repo_id = (
                await db.exec(
                    select(Repository.id).where(
                        Repository.owner == owner, Repository.name == repository
                    )
                )
            ).first()
            where.append(col(Job.repository_id) == (repo_id or "-"))
        total = (await db.exec(select(func.count()).select_from(Job).where(*where))).one()
        rows = await db.exec(
            select(Job)
            .where(*where)
            .order_by(col(Job.created_at).desc())
            .offset(offset)
            .limit(limit)
        )
        return list(rows.all()), int(total)

    async def upload(
        self, db: AsyncSession, *, owner: str, job_id: str, files: list[Upload]
    ) -> Job:
        """Store uploaded files with the job (only while ``created``). A file of a name already
        uploaded replaces it. Raises InvalidRequest (a bad name, too many files), Conflict (the
        job was started) or RequestTooLarge (a file over CCGATE_JOB_MAX_FILE_BYTES: nothing of
        that request is kept)."""
        job = await self.get(db, owner=owner, job_id=job_id)
        if job.status is not JobStatus.CREATED:
            raise Conflict(f"job {job_id} is {job.status.value}; upload files before starting it")
        names = [f.filename or "" for f in files]
        for name in names:
            if not _FILE_NAME.match(name) or len(name.encode()) > 255:
                raise InvalidRequest(
                    f"file name {name!r} must be a plain name (no '/', not starting with '.', "
                    "at most 255 bytes)"
                )
        known = {f["name"]: f for f in job.files}
        if len(known.keys() | set(names)) > self._settings.job_max_files:
            raise InvalidRequest(
                f"a job takes at most {self._settings.job_max_files} files (CCGATE_JOB_MAX_FILES)"
            )
        directory = self._workspaces.uploads_dir(job.id)
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        received: list[tuple[str, Path, int]] = []
        try:
            for name, upload in zip(names, files, strict=True):
                partial = directory / f".partial-{uuid.uuid4().hex}"
                size = await self._receive(upload, partial, limit=self._settings.job_max_file_bytes)
                received.append((name, partial, size))
        except BaseException:
            for _, partial, _ in received:
                partial.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                for stray in directory.glob(".partial-*"):
                    stray.unlink()
            raise
        for name, partial, size in received:
            os.replace(partial, directory / name)
            known[name] = {"name": name, "size": size}
        job.files = list(known.values())
        db.add(job)
        await db.commit()
        return job

    async def _receive(self, upload: Upload, target: Path, *, limit: int) -> int:
        size = 0
        with target.open("wb") as out:
            while chunk := await upload.read(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise RequestTooLarge(
                        f"{upload.filename} is larger than {limit} bytes "
                        "(CCGATE_JOB_MAX_FILE_BYTES, CCGATE_JOB_MAX_ZIP_BYTES for a zip)"
                    )
                await asyncio.to_thread(out.write, chunk)
        return size

    async def upload_workspace(
        self, db: AsyncSession, *, owner: str, job_id: str, upload: Upload
    ) -> Job:
        """Store the zip archive of a ``created`` zip job (replacing an earlier one); it is
        unpacked into the workspace when the job runs. RequestTooLarge over
        CCGATE_JOB_MAX_ZIP_BYTES; Conflict for another kind of job or one already started."""
        job = await self.get(db, owner=owner, job_id=job_id)
        if job.source.get("type") != "zip":
            raise Conflict(f"job {job_id} does not run on a zip (its source is {job.source})")
        if job.status is not JobStatus.CREATED:
            raise Conflict(f"job {job_id} is {job.status.value}; upload its zip before starting")
        directory = self._workspaces.job_dir(job.id)
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        partial = directory / f".partial-{uuid.uuid4().hex}"
        try:
            size = await self._receive(upload, partial, limit=self._settings.job_max_zip_bytes)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, self._workspaces.zip_path(job.id))
        job.source = {**job.source, "zip_bytes": size}
        db.add(job)
        await db.commit()
        return job

    async def start(self, db: AsyncSession, *, owner: str, job_id: str) -> Job:
        """created → queued. Conflict when it was started already or is a zip job without its
        zip; AdmissionRefused when the queue is full."""
        job = await self.get(db, owner=owner, job_id=job_id)
        if job.source.get("type") == "zip" and not self._workspaces.zip_path(job.id).is_file():
            raise Conflict(f"job {job_id} runs on a zip: upload it first (PUT …/workspace)")
        await self._check_room(db)
        moved = await db.exec(
            update(Job)
            .where(col(Job.id) == job.id, col(Job.status) == JobStatus.CREATED)
            .values(status=JobStatus.QUEUED, queued_at=utcnow())
        )
        await db.commit()
        if moved.rowcount != 1:
            raise Conflict(f"job {job_id} was already started")
        self._wake()
        await db.refresh(job)
        return job

    async def cancel(self, db: AsyncSession, *, owner: str, job_id: str) -> Job:
        """A job not yet running is cancelled at once; a running one is marked and its runner
        stops its session (the CLI and the container) within a few seconds. A finished job is
        returned as it is."""
        job = await self.get(db, owner=owner, job_id=job_id)
        now = utcnow()
        await db.exec(
            update(Job)
            .where(col(Job.id) == job.id, col(Job.status).in_([JobStatus.CREATED, *_PENDING]))
            .values(status=JobStatus.CANCELLED, finished_at=now, error="cancelled before it ran")
        )
        await db.exec(
            update(Job)
            .where(col(Job.id) == job.id, col(Job.status).in_([s for s in JobStatus if s.active]))
            .values(cancel_requested=True)
        )
        await db.commit()
        self._wake()
        await db.refresh(job)
        return job

    async def delete(self, db: AsyncSession, *, owner: str, job_id: str) -> None:
        """Delete a job that is not running: its session (events, artifacts), its workspace
        and uploads, and its row. Conflict while it runs (cancel it first)."""
        job = await self.get(db, owner=owner, job_id=job_id)
        if job.status.active or job.status is JobStatus.QUEUED:
            raise Conflict(f"job {job_id} is {job.status.value}; cancel it before deleting it")
        if job.session_id is not None:
            session = await db.get(Session, job.session_id)
            if session is not None:
                await self._sessions.delete(db=db, session=session)
        ws = PreparedWorkspace.from_json(job.workspace) if job.workspace else None
        await self._workspaces.remove(job.id, ws)
        await db.delete(job)
        await db.commit()
        if job.repository_id is not None:
            await self._repositories.collect(job.repository_id)

    # --- the workspace ------------------------------------------------------------------

    async def _workspace(self, db: AsyncSession, owner: str, job_id: str) -> PreparedWorkspace:
        job = await self.get(db, owner=owner, job_id=job_id)
        if job.workspace_expired_at is not None:
            when = f"{job.workspace_expired_at:%Y-%m-%d %H:%M} UTC"
            raise Conflict(
                f"the workspace of job {job_id} was removed {when}, after "
                "CCGATE_JOB_WORKSPACE_RETENTION_S; its result is kept"
            )
        if not job.workspace:
            raise Conflict(f"job {job_id} has no workspace yet ({job.status.value})")
        return PreparedWorkspace.from_json(job.workspace)

    async def list_dir(
        self, db: AsyncSession, *, owner: str, job_id: str, path: str
    ) -> list[workspace_files.Entry]:
        """One directory of the job's workspace (workspace_files.py)."""
        ws = await self._workspace(db, owner, job_id)
        return await asyncio.to_thread(workspace_files.list_dir, ws, path)

    async def changes(
        self, db: AsyncSession, *, owner: str, job_id: str
    ) -> tuple[list[workspace_files.Change], bool]:
        """What the job added, modified and deleted."""
        ws = await self._workspace(db, owner, job_id)
        return await asyncio.to_thread(workspace_files.changed_files, ws)

    async def file(self, db: AsyncSession, *, owner: str, job_id: str, path: str) -> Path:
        """The host path of one regular file of the job's workspace (no symlink followed)."""
        ws = await self._workspace(db, owner, job_id)
        return await asyncio.to_thread(workspace_files.file_path, ws, path)
