"""claude-code-ops' task API (``/api/tasks``) for its clients: the same jobs as ``/api/v1/jobs``
in its shapes (task_schemas.py). ``DELETE`` cancels, as there."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile, status
from fastapi.responses import FileResponse

from gateway.api.jobs import Jobs
from gateway.deps import DbDep, UserToken
from gateway.schemas import API_ERRORS
from gateway.task_schemas import TaskArtifact, TaskCreate, TaskPublic, TaskStatus, job_statuses

router = APIRouter(prefix="/api/tasks", tags=["tasks (claude-code-ops)"], responses=API_ERRORS)


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_task(body: TaskCreate, user: UserToken, db: DbDep, jobs: Jobs) -> TaskPublic:
    """Create and queue a task (a zip task waits for ``PUT /api/tasks/{id}/workspace``)."""
    job = await jobs.create(db, owner=user.user, body=body.as_job())
    return TaskPublic.of(job)


@router.get("")
async def list_tasks(
    user: UserToken,
    db: DbDep,
    jobs: Jobs,
    status_: Annotated[TaskStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> list[TaskPublic]:
    """Your tasks, newest first (optionally of one status)."""
    rows, _ = await jobs.list_jobs(
        db,
        owner=user.user,
        status=None,
        statuses=job_statuses(status_) if status_ else None,
        tag=None,
        repository=None,
        limit=limit,
        offset=offset,
    )
    return [TaskPublic.of(j) for j in rows]


@router.get("/{task_id}")
async def get_task(task_id: str, user: UserToken, db: DbDep, jobs: Jobs) -> TaskPublic:
    """One task."""
    return TaskPublic.of(await jobs.get(db, owner=user.user, job_id=task_id))


@router.put("/{task_id}/workspace")
async def upload_task_zip(
    task_id: str,
    user: UserToken,
    db: DbDep,
    jobs: Jobs,
    file: Annotated[UploadFile, File(description="the zip archive")],
) -> TaskPublic:
    """Upload the zip of a ``files: {type: zip}`` task; the task is then queued."""
    await jobs.upload_workspace(db, owner=user.user, job_id=task_id, upload=file)
    return TaskPublic.of(await jobs.start(db, owner=user.user, job_id=task_id))


@router.get("/{task_id}/artifacts")
async def list_artifacts(
    task_id: str, user: UserToken, db: DbDep, jobs: Jobs
) -> list[TaskArtifact]:
    """Files the task added or modified in its workspace."""
    changes, _ = await jobs.changes(db, owner=user.user, job_id=task_id)
    return [TaskArtifact(path=c.path, size=c.size) for c in changes if c.change != "deleted"]


@router.get(
    "/{task_id}/artifacts/{path:path}",
    response_model=None,
    responses={
        200: {"description": "the file's bytes", "content": {"application/octet-stream": {}}}
    },
)
async def download_artifact(
    task_id: str, path: str, user: UserToken, db: DbDep, jobs: Jobs
) -> FileResponse:
    """Download one file of the task's workspace."""
    host_path = await jobs.file(db, owner=user.user, job_id=task_id, path=path)
    return FileResponse(host_path, filename=host_path.name)


@router.delete("/{task_id}")
async def cancel_task(task_id: str, user: UserToken, db: DbDep, jobs: Jobs) -> TaskPublic:
    """Cancel the task (a running one's container is stopped within seconds)."""
    return TaskPublic.of(await jobs.cancel(db, owner=user.user, job_id=task_id))
