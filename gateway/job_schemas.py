"""Request and response bodies of ``/api/v1/jobs`` (the shapes of Claude Batch Server's jobs,
with claude-code-ops' options)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.db.models import Job, JobStatus, as_utc
from gateway.schemas import PermissionMode, SessionConfig, check_json_schema

TAG = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
PROFILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RepositorySource(_Strict):
    """Run on a registered repository's clone (a copy-on-write workspace of it)."""

    type: Literal["repository"]
    repository: str = Field(min_length=1, max_length=100, description="the repository's name")
    git_aware: bool = Field(default=True, description="pull the repository before the run")


class GitSource(_Strict):
    """Run on a fresh shallow clone of a git URL (same URL policy as repositories)."""

    type: Literal["git"]
    url: str = Field(min_length=1, max_length=2048)
    ref: str | None = Field(default=None, max_length=255, description="branch or tag")


class ZipSource(_Strict):
    """Run on the files of a zip archive, uploaded with ``PUT /jobs/{id}/workspace`` before the
    job starts (create it with ``start: false``)."""

    type: Literal["zip"]


class EmptySource(_Strict):
    """Run in an empty workspace (plus the uploaded files)."""

    type: Literal["empty"] = "empty"


JobSource = Annotated[
    RepositorySource | GitSource | ZipSource | EmptySource, Field(discriminator="type")
]


class JobCreate(_Strict):
    """``POST /jobs``: a prompt, where it runs, and how. ``{{name}}`` in the prompt becomes the
    path of the uploaded file ``name`` when the job starts."""

    prompt: str = Field(min_length=1, max_length=100_000)
    source: JobSource = Field(default_factory=EmptySource)
    model: str | None = Field(default=None, min_length=1, max_length=200)
    permission_mode: PermissionMode | None = None
    allowed_tools: list[str] = Field(default_factory=list, max_length=200)
    disallowed_tools: list[str] = Field(default_factory=list, max_length=200)
    max_turns: int | None = Field(default=None, ge=1, le=10_000)
    system_prompt: str | None = Field(default=None, max_length=100_000)
    append_system_prompt: str | None = Field(default=None, max_length=100_000)
    json_schema: dict[str, Any] | None = Field(
        default=None, description="JSON Schema the result must conform to (structured output)"
    )
    mcp_servers: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="MCP servers of this job (as a session's)"
    )
    mcp_profiles: list[Annotated[str, Field(pattern=PROFILE_NAME)]] = Field(
        default_factory=list, max_length=10
    )
    tags: list[Annotated[str, Field(pattern=TAG)]] = Field(default_factory=list, max_length=20)
    timeout_s: int | None = Field(default=None, ge=1, description="default CCGATE_JOB_TIMEOUT_S")
    start: bool = Field(default=True, description="false: stay 'created' until POST …/start")

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            check_json_schema(schema)
        return schema

    @model_validator(mode="after")
    def _runs_as_a_session(self) -> JobCreate:
        # The options are a session's config: the same rules (tool rules, MCP servers…), so
        # that a job is refused here (422) rather than when it runs.
        try:
            self.session_config()
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"{where}: {first['msg']}") from None
        return self

    def session_config(self) -> SessionConfig:
        """The session config the job's session runs with (validated like a session's)."""
        return SessionConfig.model_validate(
            self.model_dump(
                include={
                    "model",
                    "permission_mode",
                    "allowed_tools",
                    "disallowed_tools",
                    "max_turns",
                    "system_prompt",
                    "append_system_prompt",
                    "json_schema",
                    "mcp_servers",
                    "mcp_profiles",
                },
                exclude_none=True,
            )
        )


class JobFile(BaseModel):
    """An uploaded file: its name (the ``{{name}}`` placeholder) and size in bytes."""

    name: str
    size: int


class JobPublic(BaseModel):
    """A job as its owner sees it."""

    id: str
    status: JobStatus
    queue_position: int | None = Field(description="1 = next to run; only while queued")
    prompt: str
    source: dict[str, Any]
    options: dict[str, Any]
    tags: list[str]
    files: list[JobFile]
    timeout_s: int
    session_id: str | None = Field(description="its events: /sessions/{session_id}/stream")
    workspace_mode: str | None = Field(description="overlay, copy or empty")
    workspace_expired_at: datetime | None = Field(
        description="when its workspace was removed (retention); files are then 409"
    )
    git_commit: str | None
    git_status: str | None
    result: str | None
    structured_output: Any = None
    error: str | None
    cost_usd: float | None
    usage: dict[str, Any] | None
    num_turns: int | None
    duration_ms: int | None
    cancel_requested: bool
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: Job, position: int | None = None) -> JobPublic:
        """The API view of a row."""
        return cls(
            id=job.id,
            status=job.status,
            queue_position=position,
            prompt=job.prompt,
            source=job.source,
            options=job.options,
            tags=[t for t in job.tags.split(",") if t],
            files=[JobFile(name=f["name"], size=f["size"]) for f in job.files],
            timeout_s=job.timeout_s,
            session_id=job.session_id,
            workspace_mode=(job.workspace or {}).get("mode"),
            workspace_expired_at=as_utc(job.workspace_expired_at),
            git_commit=job.git_commit,
            git_status=job.git_status,
            result=job.result,
            structured_output=job.structured_output,
            error=job.error,
            cost_usd=job.cost_usd,
            usage=job.usage,
            num_turns=job.num_turns,
            duration_ms=job.duration_ms,
            cancel_requested=job.cancel_requested,
            created_at=as_utc(job.created_at) or job.created_at,
            queued_at=as_utc(job.queued_at),
            started_at=as_utc(job.started_at),
            finished_at=as_utc(job.finished_at),
        )


class JobList(BaseModel):
    """One page of jobs, newest first."""

    jobs: list[JobPublic]
    total: int
    limit: int
    offset: int


class WorkspaceEntry(BaseModel):
    """One name in a workspace directory (``kind``: file, dir, symlink, other)."""

    name: str
    kind: str
    size: int | None


class WorkspaceListing(BaseModel):
    """A workspace directory's entries."""

    path: str
    entries: list[WorkspaceEntry]


class WorkspaceChange(BaseModel):
    """A path the job added, modified or deleted."""

    path: str
    change: Literal["added", "modified", "deleted"]
    size: int | None


class WorkspaceChanges(BaseModel):
    """What the job changed in its workspace (``truncated``: more than could be listed)."""

    changes: list[WorkspaceChange]
    truncated: bool


class FileContent(BaseModel):
    """A workspace file's text (UTF-8; undecodable bytes replaced)."""

    path: str
    size: int
    content: str
