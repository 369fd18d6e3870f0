"""Job resource: batch runs of one prompt on a workspace (``/api/v1/jobs``). A job runs on a
session: its events stream over ``/sessions/{session_id}/stream`` like any other's."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, Request, Response, UploadFile, status
from fastapi.responses import FileResponse

from gateway.db.models import JobStatus
from gateway.deps import DbDep, UserToken
from gateway.errors import RequestTooLarge
from gateway.job_schemas import (
    FileContent,
    JobCreate,
    JobList,
    JobPublic,
    WorkspaceChange,
    WorkspaceChanges,
    WorkspaceEntry,
    WorkspaceListing,
)
from gateway.services.jobs import JobService

router = APIRouter(prefix="/jobs", tags=["jobs"])

TEXT_MAX_BYTES = 1024 * 1024
"""Largest file ``?format=text`` returns (download bigger ones)."""


def get_jobs(request: Request) -> JobService:
    """The process's JobService."""
    service: JobService = request.app.state.jobs
    return service


Jobs = Annotated[JobService, Depends(get_jobs)]


async def _public(jobs: JobService, db: DbDep, job_id: str, owner: str) -> JobPublic:
    job = await jobs.get(db, owner=owner, job_id=job_id)
    position = (await jobs.positions(db)).get(job.id) if job.status is JobStatus.QUEUED else None
    return JobPublic.of(job, position)


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_job(body: JobCreate, user: UserToken, db: DbDep, jobs: Jobs) -> JobPublic:
    """Create a job: ``queued`` (``start: true``, the default) or ``created`` (upload files,
    then ``POST …/start``). 422 for an unknown repository or MCP profile, a refused git URL
    or a timeout over the maximum; 429 when the queue is full."""
    job = await jobs.create(db, owner=user.user, body=body)
    return await _public(jobs, db, job.id, user.user)


@router.get("")
async def list_jobs(
    user: UserToken,
    db: DbDep,
    jobs: Jobs,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    tag: Annotated[str | None, Query(max_length=64)] = None,
    repository: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> JobList:
    """Your jobs, newest first; filter by status, a tag, a repository name."""
    rows, total = await jobs.list_jobs(
        db,
        owner=user.user,
        status=status_,
        tag=tag,
        repository=repository,
        limit=limit,
        offset=offset,
    )
    positions = await jobs.positions(db)
    return JobList(
        jobs=[JobPublic.of(j, positions.get(j.id)) for j in rows],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.get("/{job_id}")
async def get_job(job_id: str, user: UserToken, db: DbDep, jobs: Jobs) -> JobPublic:
    """One job: status, queue position, result, structured output, cost, usage, error."""
    return await _public(jobs, db, job_id, user.user)


@router.post("/{job_id}/files")
async def upload_files(
    job_id: str,
    user: UserToken,
    db: DbDep,
    jobs: Jobs,
    files: Annotated[list[UploadFile], File(description="one or more files")],
) -> JobPublic:
    """Upload files to a ``created`` job (multipart, field ``files``; names kept). They are in
    the workspace under ``.ccgate/uploads/`` and ``{{name}}`` in the prompt becomes that path.
    413 over CCGATE_JOB_MAX_FILE_BYTES, 409 once the job was started."""
    await jobs.upload(db, owner=user.user, job_id=job_id, files=list(files))
    return await _public(jobs, db, job_id, user.user)


@router.put("/{job_id}/workspace")
async def upload_workspace(
    job_id: str,
    user: UserToken,
    db: DbDep,
    jobs: Jobs,
    file: Annotated[UploadFile, File(description="the zip archive")],
) -> JobPublic:
    """Upload the zip of a ``created`` job whose source is ``zip`` (multipart, field ``file``);
    it is unpacked into the workspace when the job runs (paths leaving it, symlinks, or more
    than CCGATE_JOB_MAX_ZIP_BYTES unpacked fail the job). 413 over CCGATE_JOB_MAX_ZIP_BYTES."""
    await jobs.upload_workspace(db, owner=user.user, job_id=job_id, upload=file)
    return await _public(jobs, db, job_id, user.user)


@router.post("/{job_id}/start", status_code=status.HTTP_202_ACCEPTED)
async def start_job(job_id: str, user: UserToken, db: DbDep, jobs: Jobs) -> JobPublic:
    """Queue a ``created`` job; 409 when it was started already."""
    await jobs.start(db, owner=user.user, job_id=job_id)
    return await _public(jobs, db, job_id, user.user)


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED)
async def cancel_job(job_id: str, user: UserToken, db: DbDep, jobs: Jobs) -> JobPublic:
    """Cancel: at once when not running; a running job's session (CLI and container) is
    stopped within seconds (``cancel_requested`` until then)."""
    await jobs.cancel(db, owner=user.user, job_id=job_id)
    return await _public(jobs, db, job_id, user.user)


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_job(job_id: str, user: UserToken, db: DbDep, jobs: Jobs) -> Response:
    """Delete a finished job with its session, workspace and files; 409 while it is queued or
    running (cancel it first)."""
    await jobs.delete(db, owner=user.user, job_id=job_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{job_id}/files")
async def list_workspace(
    job_id: str,
    user: UserToken,
    db: DbDep,
    jobs: Jobs,
    path: Annotated[str, Query(max_length=4096)] = "",
) -> WorkspaceListing:
    """One directory of the job's workspace (``path`` relative to it; default its root)."""
    entries = await jobs.list_dir(db, owner=user.user, job_id=job_id, path=path)
    return WorkspaceListing(
        path=path, entries=[WorkspaceEntry(name=e.name, kind=e.kind, size=e.size) for e in entries]
    )


@router.get("/{job_id}/changes")
async def workspace_changes(
    job_id: str, user: UserToken, db: DbDep, jobs: Jobs
) -> WorkspaceChanges:
    """Files the job added, modified or deleted in its workspace (on a repository: against
    the clone it started from)."""
    changes, truncated = await jobs.changes(db, owner=user.user, job_id=job_id)
    return WorkspaceChanges(
        changes=[WorkspaceChange(path=c.path, change=c.change, size=c.size) for c in changes],
        truncated=truncated,
    )


@router.get(
    "/{job_id}/files/{path:path}",
    response_model=None,
    responses={
        200: {
            "description": "the file's bytes, or with ?format=text its text as JSON",
            "content": {
                "application/octet-stream": {},
                "application/json": {"schema": FileContent.model_json_schema()},
            },
        }
    },
)
async def read_workspace_file(
    job_id: str,
    path: str,
    user: UserToken,
    db: DbDep,
    jobs: Jobs,
    format_: Annotated[str, Query(alias="format", pattern="^(raw|text)$")] = "raw",
) -> FileResponse | FileContent:
    """Download one file of the workspace, or (``?format=text``) its text as JSON (at most
    1 MiB). 404 for a missing file, a directory or a symlink; 422 for a path leaving the
    workspace."""
    host_path = await jobs.file(db, owner=user.user, job_id=job_id, path=path)
    if format_ == "text":
        size = host_path.stat().st_size
        if size > TEXT_MAX_BYTES:
            raise RequestTooLarge(f"{path} is {size} bytes; download it instead")
        data = host_path.read_bytes()[:TEXT_MAX_BYTES]
        return FileContent(path=path, size=size, content=data.decode(errors="replace"))
    return FileResponse(host_path, filename=host_path.name)
