"""``/api/tasks``: claude-code-ops' task shapes, for its clients (CLI, SDK), mapped onto jobs.

Request (its README): ``{prompt, apiKey?, mode?, model?, schema?, timeout? (ms),
permissionMode?, files?: {type: zip|git, gitUrl?, gitRef?}, mcpServers?: {inline?, profiles?},
tags?: {key: value}}``. ``apiKey`` and ``mode`` are accepted and ignored: ccgate keeps the model
key itself (the container never sees one) and always runs a container. Statuses are its five:
``queued`` (created, queued), ``running`` (git_pulling, running), ``completed``, ``failed``
(failed, git_failed, timeout: ``error`` says which), ``cancelled``.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.db.models import Job, JobStatus, as_utc
from gateway.errors import InvalidRequest
from gateway.job_schemas import EmptySource, GitSource, JobCreate, JobSource, ZipSource
from gateway.schemas import PermissionMode

TaskStatus = Literal["queued", "running", "completed", "failed", "cancelled"]

_STATUS: dict[JobStatus, TaskStatus] = {
    JobStatus.CREATED: "queued",
    JobStatus.QUEUED: "queued",
    JobStatus.GIT_PULLING: "running",
    JobStatus.RUNNING: "running",
    JobStatus.COMPLETED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.GIT_FAILED: "failed",
    JobStatus.TIMEOUT: "failed",
    JobStatus.CANCELLED: "cancelled",
}


def job_statuses(status: TaskStatus) -> list[JobStatus]:
    """The job statuses a task status stands for."""
    return [j for j, t in _STATUS.items() if t == status]


class TaskFiles(BaseModel):
    """Where the task's workspace comes from."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["zip", "git"]
    gitUrl: str | None = Field(default=None, max_length=2048)
    gitRef: str | None = Field(default=None, max_length=255)


class TaskMcpServers(BaseModel):
    """Inline MCP servers and names of MCP profiles."""

    model_config = ConfigDict(extra="forbid")

    inline: dict[str, dict[str, Any]] = Field(default_factory=dict)
    profiles: list[str] = Field(default_factory=list, max_length=10)


class TaskCreate(BaseModel):
    """``POST /api/tasks``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=100_000)
    apiKey: str | None = Field(default=None, description="ignored: ccgate holds the model key")
    mode: Literal["process", "container"] | None = Field(default=None, description="ignored")
    model: str | None = Field(default=None, min_length=1, max_length=200)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    timeout: int | None = Field(default=None, ge=1000, description="milliseconds")
    permissionMode: PermissionMode | None = None
    files: TaskFiles | None = None
    mcpServers: TaskMcpServers | None = None
    tags: dict[str, str] = Field(default_factory=dict, max_length=20)

    def as_job(self) -> JobCreate:
        """The job this task is. Raises InvalidRequest (422) for what a job refuses (a tag
        that is not ``key:value`` of letters, digits, ``_.-``; a bad schema)."""
        try:
            return self._job()
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InvalidRequest(f"{where}: {first['msg']}") from exc

    def _job(self) -> JobCreate:
        source: JobSource = EmptySource()
        if self.files is not None and self.files.type == "git":
            source = GitSource(type="git", url=self.files.gitUrl or "", ref=self.files.gitRef)
        elif self.files is not None:
            source = ZipSource(type="zip")
        servers = self.mcpServers or TaskMcpServers()
        return JobCreate.model_validate(
            {
                "prompt": self.prompt,
                "source": source.model_dump(),
                "model": self.model,
                "permission_mode": self.permissionMode,
                "json_schema": self.schema_,
                "timeout_s": math.ceil(self.timeout / 1000) if self.timeout else None,
                "mcp_servers": servers.inline,
                "mcp_profiles": servers.profiles,
                "tags": [f"{k}:{v}" for k, v in self.tags.items()],
                "start": not isinstance(source, ZipSource),
            }
        )


class TaskResult(BaseModel):
    """What the run produced: ``data`` is the structured output (with ``schema``), ``text``
    the result text."""

    text: str | None
    data: Any = None
    costUsd: float | None
    usage: dict[str, Any] | None
    durationMs: int | None
    numTurns: int | None


class TaskPublic(BaseModel):
    """A task as claude-code-ops' clients read it (``id`` is the job's id: the same job is at
    ``/api/v1/jobs/{id}`` with every detail)."""

    id: str
    status: TaskStatus
    prompt: str
    model: str | None
    tags: dict[str, str]
    result: TaskResult | None
    error: str | None
    sessionId: str | None
    createdAt: datetime
    startedAt: datetime | None
    completedAt: datetime | None

    @classmethod
    def of(cls, job: Job) -> TaskPublic:
        """The task view of a job."""
        tags = dict(t.partition(":")[::2] for t in job.tags.split(",") if t)
        done = job.status in (JobStatus.COMPLETED, JobStatus.FAILED)
        return cls(
            id=job.id,
            status=_STATUS[job.status],
            prompt=job.prompt,
            model=job.options.get("model"),
            tags=tags,
            result=TaskResult(
                text=job.result,
                data=job.structured_output,
                costUsd=job.cost_usd,
                usage=job.usage,
                durationMs=job.duration_ms,
                numTurns=job.num_turns,
            )
            if done or job.result is not None
            else None,
            error=job.error if job.status is not JobStatus.COMPLETED else None,
            sessionId=job.session_id,
            createdAt=as_utc(job.created_at) or job.created_at,
            startedAt=as_utc(job.started_at),
            completedAt=as_utc(job.finished_at),
        )


class TaskArtifact(BaseModel):
    """A file the task added or modified in its workspace."""

    path: str
    size: int | None
