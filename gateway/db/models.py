"""Tables: Session, SpawnTree, Turn, Artifact, Event, DeadLetter, ModelRequest, UsageDay,
PoolSlot, Repository, McpProfile, Job.

One Session row per ccgate session (its container, status and running totals); one Turn row per
prompt (``id`` is the ``message_id`` the API returns); one Artifact row per file collected from the
workspace; one Event row per envelope persisted by the ledger (``(session_id, seq)`` unique); one
DeadLetter row per stream entry the ledger gave up on; one ModelRequest row per Messages API
request the model proxy forwarded (the metered cost); one UsageDay row per user and UTC day; one
Repository row per registered git repository; one McpProfile row per saved set of MCP servers. The
schema is versioned by Alembic
(``gateway/db/migrations``); a change here needs a new revision there.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """Timezone-aware now in UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes: mark them UTC (they were stored as UTC)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _ts(**kw: Any) -> Any:
    return Field(sa_column=Column(DateTime(timezone=True), **kw))


class WorkspaceType(StrEnum):
    """Where a session's /workspace comes from (the one workspace enum: the API, the services
    and the ``session.workspace_type`` column all use it)."""

    EPHEMERAL = "ephemeral"  # a fresh volume, deleted with the session
    PERSISTENT = "persistent"  # a named volume of the owner's, kept across sessions
    INHERIT = "inherit"  # a child shares its parent's workspace volume
    CLONE = "clone"  # a child gets a copy of its parent's workspace, made at spawn time
    JOB = "job"  # a job's workspace (job_workspace.py), made and removed by the job

    @property
    def shared(self) -> bool:
        """True when the volume belongs to someone else and outlives this session."""
        return self in (WorkspaceType.PERSISTENT, WorkspaceType.INHERIT, WorkspaceType.JOB)


class SessionStatus(StrEnum):
    """Persisted session lifecycle::

    starting -> idle <-> running -> stopped | failed
                 |  ^        |
                 v  |        v (container died)
                paused <-----+      (next prompt: starting again, with --resume)
    """

    QUEUED = "queued"  # waiting for admission (a limit was reached and the client asked to
    # queue): no container yet; chats queue; the lifecycle loop starts it when room frees
    STARTING = "starting"  # container created; the CLI is not ready yet (chats queue)
    IDLE = "idle"  # ready, no turn running
    RUNNING = "running"  # a turn is running (further chats queue)
    PAUSED = "paused"  # no container (idle timeout, asked, or it died); volumes, transcript,
    # queued prompts and seq kept: the next prompt resumes it in a new container
    STOPPED = "stopped"  # stopped on request; container removed, volumes kept until delete
    FAILED = "failed"  # the container or CLI died and could not recover

    @property
    def live(self) -> bool:
        """True while the session has (or is getting) a container."""
        return self in (SessionStatus.STARTING, SessionStatus.IDLE, SessionStatus.RUNNING)

    @property
    def open(self) -> bool:
        """True until the session ends: live, paused (a prompt resumes it) or queued."""
        return self.live or self in (SessionStatus.PAUSED, SessionStatus.QUEUED)


class TurnStatus(StrEnum):
    """Lifecycle of one prompt."""

    QUEUED = "queued"  # accepted, waiting for the CLI
    RUNNING = "running"  # written to the CLI
    COMPLETED = "completed"  # the CLI returned a successful result
    FAILED = "failed"  # the CLI returned an error result, or died
    INTERRUPTED = "interrupted"  # interrupted by the client or by the turn timeout
    CANCELLED = "cancelled"  # never ran: the session stopped first

    @property
    def final(self) -> bool:
        """True once the turn will not change again."""
        return self not in (TurnStatus.QUEUED, TurnStatus.RUNNING)


class Session(SQLModel, table=True):
    """A ccgate session: one container running one Claude Code CLI."""

    id: str = Field(primary_key=True, max_length=36)
    owner: str = Field(index=True, max_length=255)
    status: SessionStatus = Field(default=SessionStatus.STARTING, index=True)
    container_id: str | None = Field(default=None, max_length=80)
    workspace_type: str = Field(default=WorkspaceType.EPHEMERAL, max_length=20)
    """A WorkspaceType value."""
    workspace_id: str | None = Field(default=None, max_length=128)
    workspace_volume: str = Field(max_length=200)
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    parent_session_id: str | None = Field(default=None, index=True, max_length=36)
    root_id: str = Field(default="", index=True, max_length=36)
    depth: int = 0
    live_children: int = 0
    callback_url: str | None = Field(default=None, max_length=2000)
    cli_session_id: str | None = Field(default=None, max_length=64)
    created_at: datetime = _ts(nullable=False, default=utcnow)
    last_activity: datetime = _ts(nullable=False, default=utcnow)
    total_cost_usd: float = 0.0
    """Metered by the model proxy (USD), never the CLI's own report."""
    total_turns: int = 0
    usage: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    """Token totals metered by the model proxy (input, output, cache read, cache write)."""
    error: str | None = Field(default=None, sa_column=Column(Text))
    proxy_key_hash: str | None = Field(default=None, max_length=64, unique=True, index=True)
    """SHA-256 of the session's model-proxy credential; cleared when the session ends."""
    budget_usd: float | None = None
    """This session's own cost budget (None: unlimited)."""
    reserved_usd: float = 0.0
    """Cost reserved by model requests in flight (released when each is metered)."""
    paused_reason: str | None = Field(default=None, max_length=32)
    """Why the session is (or was last) paused: ``idle``, ``requested``, or how its container
    died (``oom``, ``killed``, ``exited``, ``crashed``)."""
    crashes: int = 0
    """Container deaths since the last completed turn (over the limit: failed, not paused)."""
    idle_timeout_s: int | None = None
    """Seconds idle before the container is paused (None: the deployment's default, 0: never)."""
    expires_at: datetime | None = _ts(nullable=True)
    """End of the session's maximum lifetime (None: unlimited); then it is stopped."""
    resumed_at: datetime | None = _ts(nullable=True)
    """When the last resume began (its ``ready`` measures the resume time)."""
    queue_position: int | None = None
    """1-based place in the admission queue while the session waits for room (queued, or
    paused with a prompt waiting); None otherwise."""


class PoolSlot(SQLModel, table=True):
    """A warm-pool container not yet claimed: its id is the session id it will serve (the
    container, its volumes, its Redis keys and ACL user are already named for it). Claiming
    deletes the row and inserts the session with the same id in one transaction."""

    __tablename__ = "pool_slot"

    id: str = Field(primary_key=True, max_length=36)
    profile: str = Field(index=True, max_length=32)
    fingerprint: str = Field(index=True, max_length=64)
    """SHA-256 of what the container runs (warm_pool.container_fingerprint)."""
    status: str = Field(default="starting", max_length=16)
    """``starting`` (being created, not claimable) or ``ready`` (CLI initialized)."""
    container_id: str | None = Field(default=None, max_length=80)
    proxy_key_hash: str = Field(max_length=64)
    """SHA-256 of the model-proxy credential in the container's environment; the claiming
    session takes it over."""
    created_at: datetime = _ts(nullable=False, default=utcnow)
    ready_at: datetime | None = _ts(nullable=True)


class SpawnTree(SQLModel, table=True):
    """Counters of one session tree (a root and every session spawned under it).

    Limits are enforced with conditional UPDATEs on this row (and on the parent's
    ``live_children``), so concurrent spawns cannot race past them on SQLite or PostgreSQL.
    """

    root_id: str = Field(primary_key=True, max_length=36)
    owner: str = Field(max_length=255)
    sessions_created: int = 1
    live_sessions: int = 1
    spend_usd: float = 0.0
    budget_usd: float | None = None
    reserved_usd: float = 0.0
    """Cost reserved by the tree's model requests in flight."""


class Turn(SQLModel, table=True):
    """One prompt and its result; ``id`` is the API's ``message_id``."""

    id: str = Field(primary_key=True, max_length=36)
    session_id: str = Field(index=True, foreign_key="session.id", max_length=36)
    prompt: str = Field(sa_column=Column(Text, nullable=False))
    status: TurnStatus = Field(default=TurnStatus.QUEUED)
    subtype: str | None = Field(default=None, max_length=64)
    is_error: bool | None = None
    result: str | None = Field(default=None, sa_column=Column(Text))
    structured_output: Any = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    """The result's JSON under ``--json-schema`` (as the CLI reported it: check it again)."""
    errors: list[str] | None = Field(default=None, sa_column=Column(JSON))
    terminal_reason: str | None = Field(default=None, max_length=64)
    usage: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    total_cost_usd: float | None = None
    cost_usd: float | None = None
    num_turns: int | None = None
    duration_ms: int | None = None
    created_at: datetime = _ts(nullable=False, default=utcnow)
    started_at: datetime | None = _ts(nullable=True)
    completed_at: datetime | None = _ts(nullable=True)
    pending_files: list[dict[str, Any]] | None = Field(
        default=None, sa_column=Column(JSON(none_as_null=True))
    )
    """Changed files still to be copied into the artifact store (the collector's job)."""
    recorded_at: datetime | None = _ts(nullable=True)
    """Set once the result and every artifact of the turn are recorded (``turn_recorded``)."""
    timeout_s: float | None = None
    """The chat's own deadline (seconds), kept so a resumed container gets it again."""
    outcome: str | None = Field(default=None, max_length=16)
    """How the turn ended (wrapper/protocol.py TurnOutcome): completed, error, interrupted,
    timeout, killed, oom, exited; cancelled turns have none."""
    interrupt_requested_at: datetime | None = _ts(nullable=True)
    """When a client asked to interrupt it (the gateway kills the container if the turn is
    still open ``interrupt_grace_s`` + 5 s later)."""


class Artifact(SQLModel, table=True):
    """A workspace file collected after a turn and kept in the artifact store."""

    session_id: str = Field(primary_key=True, foreign_key="session.id", max_length=36)
    path: str = Field(primary_key=True, max_length=1024)
    size: int
    sha256: str = Field(max_length=64)
    turn_id: str | None = Field(default=None, max_length=36)
    updated_at: datetime = _ts(nullable=False, default=utcnow)


class Event(SQLModel, table=True):
    """One persisted event envelope (the ledger writes each (session_id, seq) exactly once)."""

    session_id: str = Field(primary_key=True, foreign_key="session.id", max_length=36)
    seq: int = Field(primary_key=True)
    turn_id: str | None = Field(default=None, max_length=36)
    type: str = Field(max_length=64)
    envelope: str = Field(sa_column=Column(Text, nullable=False))


class DeadLetter(SQLModel, table=True):
    """A stream entry the ledger could not apply after its retries: kept, with the reason, so
    nothing is dropped silently and the stream can be trimmed past it."""

    id: int | None = Field(default=None, primary_key=True)
    session_id: str = Field(index=True, max_length=36)
    entry_id: str = Field(max_length=64)
    seq: int | None = None
    attempts: int = 0
    reason: str = Field(sa_column=Column(Text, nullable=False))
    envelope: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = _ts(nullable=False, default=utcnow)


class ModelRequest(SQLModel, table=True):
    """One Messages API request forwarded by the model proxy, with its metered usage and cost.

    Tokens come from the upstream response (``message_start`` / ``message_delta`` usage of a
    stream, ``usage`` of a JSON Message); ``cost_usd`` prices them with the gateway's price table.
    ``complete`` is False when the stream ended before its final usage (cost then counts what
    was seen, with output tokens estimated from the bytes streamed).
    """

    id: str = Field(primary_key=True, max_length=36)
    session_id: str = Field(index=True, max_length=36)
    turn_id: str | None = Field(default=None, index=True, max_length=36)
    root_id: str = Field(index=True, max_length=36)
    owner: str = Field(index=True, max_length=255)
    model: str = Field(max_length=200)
    path: str = Field(max_length=200)
    stream: bool = False
    status_code: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0
    reserved_usd: float = 0.0
    complete: bool = True
    error: str | None = Field(default=None, sa_column=Column(Text))
    started_at: datetime = _ts(nullable=False, default=utcnow, index=True)
    duration_ms: int = 0


class UsageDay(SQLModel, table=True):
    """A user's metered usage on one UTC day (the per-user daily budget is checked here)."""

    owner: str = Field(primary_key=True, max_length=255)
    day: str = Field(primary_key=True, max_length=10)
    """``YYYY-MM-DD`` in UTC."""
    spend_usd: float = 0.0
    reserved_usd: float = 0.0
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class RepositoryStatus(StrEnum):
    """A registered repository: ``cloning`` (first clone running), ``ready`` (clone usable;
    also while a pull runs, see ``Repository.pulling``), ``failed`` (the clone failed: ``error``
    says why; a pull retries it)."""

    CLONING = "cloning"
    READY = "ready"
    FAILED = "failed"


class Repository(SQLModel, table=True):
    """A git repository registered by a user and cloned once on the gateway's host
    (``CCGATE_REPOS_DIR/<id>``); jobs get copies of that clone. ``name`` is unique per owner.
    ``worker`` and ``heartbeat_at`` say which replica runs the clone or pull in progress, so
    another one takes it over when that replica is gone."""

    __tablename__ = "repository"
    __table_args__ = (UniqueConstraint("owner", "name", name="uq_repository_owner_name"),)

    id: str = Field(primary_key=True, max_length=36)
    owner: str = Field(index=True, max_length=255)
    name: str = Field(max_length=100)
    git_url: str = Field(max_length=2048)
    branch: str | None = Field(default=None, max_length=255)
    """The branch asked for; None: the remote's default (``head_branch`` tells which)."""
    description: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    deploy_key: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    """The SSH deploy key, sealed (auth/secret_box.py); never returned."""
    status: RepositoryStatus = Field(default=RepositoryStatus.CLONING)
    pulling: bool = False
    generation: int = 0
    """The current clone is ``CCGATE_REPOS_DIR/<id>/g<generation>``; a pull that moves the
    head makes the next one, so a clone that job workspaces are mounted on never changes."""
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    head_branch: str | None = Field(default=None, max_length=255)
    head_commit: str | None = Field(default=None, max_length=64)
    head_date: datetime | None = _ts(nullable=True)
    head_subject: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    size_bytes: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    worker: str | None = Field(default=None, max_length=64)
    heartbeat_at: datetime | None = _ts(nullable=True)
    created_at: datetime = _ts(nullable=False, default=utcnow)
    updated_at: datetime = _ts(nullable=False, default=utcnow)
    pulled_at: datetime | None = _ts(nullable=True)


class McpProfile(SQLModel, table=True):
    """A reusable set of MCP servers a user attaches to jobs and sessions. ``servers`` holds
    their configs with every ``env`` and ``headers`` value blanked; the values are in
    ``secrets``, sealed (auth/secret_box.py), and never returned."""

    __tablename__ = "mcp_profile"
    __table_args__ = (UniqueConstraint("owner", "name", name="uq_mcp_profile_owner_name"),)

    id: str = Field(primary_key=True, max_length=36)
    owner: str = Field(index=True, max_length=255)
    name: str = Field(max_length=100)
    description: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    servers: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    secrets: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = _ts(nullable=False, default=utcnow)
    updated_at: datetime = _ts(nullable=False, default=utcnow)


class JobStatus(StrEnum):
    """A batch job::

    created -> queued -> git_pulling -> running -> completed | failed | timeout
                 |           |             |
                 |           v             v
                 |       git_failed    cancelled (also from created / queued)
                 +-> cancelled
    """

    CREATED = "created"  # made with start: false; files may still be uploaded
    QUEUED = "queued"  # waiting for a slot (global and per-user concurrency)
    GIT_PULLING = "git_pulling"  # taken from the queue: pulling its repository (git_aware)
    RUNNING = "running"  # its workspace is made and its session runs the prompt
    COMPLETED = "completed"
    FAILED = "failed"
    GIT_FAILED = "git_failed"  # the pull before the run failed
    TIMEOUT = "timeout"  # ran past its timeout_s; its session was stopped
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """True once the job will not change again."""
        return self in _FINAL_JOB

    @property
    def active(self) -> bool:
        """True while it holds a queue slot."""
        return self in (JobStatus.GIT_PULLING, JobStatus.RUNNING)


_FINAL_JOB = frozenset(
    {
        JobStatus.COMPLETED,
        JobStatus.FAILED,
        JobStatus.GIT_FAILED,
        JobStatus.TIMEOUT,
        JobStatus.CANCELLED,
    }
)


class Job(SQLModel, table=True):
    """A batch job: one prompt run on a workspace (a repository's clone, a git URL, a zip or
    nothing) by one ccgate session, with its files, its result and its cost.

    ``source`` is ``{"type": "repository", "repository": name, "git_aware": bool}`` |
    ``{"type": "git", "url", "ref"}`` | ``{"type": "zip"}`` | ``{"type": "empty"}``;
    ``options`` the session config the job asked for (model, permission_mode, tools,
    max_turns, json_schema, mcp_profiles…); ``files`` the uploads ``[{name, size}]``;
    ``workspace`` where its workspace is (job_workspace.py ``PreparedWorkspace``). ``tags``
    is stored ``,a,b,`` so that one tag is matched with LIKE."""

    __tablename__ = "job"

    id: str = Field(primary_key=True, max_length=36)
    owner: str = Field(index=True, max_length=255)
    status: JobStatus = Field(default=JobStatus.CREATED, index=True)
    prompt: str = Field(sa_column=Column(Text, nullable=False))
    source: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    repository_id: str | None = Field(default=None, index=True, max_length=36)
    options: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    tags: str = Field(default=",", sa_column=Column(Text, nullable=False))
    files: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    timeout_s: int
    session_id: str | None = Field(default=None, max_length=36)
    turn_id: str | None = Field(default=None, max_length=36)
    workspace: dict[str, Any] | None = Field(
        default=None, sa_column=Column(JSON(none_as_null=True))
    )
    workspace_expired_at: datetime | None = _ts(nullable=True)
    """When the finished job's workspace was removed (CCGATE_JOB_WORKSPACE_RETENTION_S)."""
    git_commit: str | None = Field(default=None, max_length=64)
    """The commit the job's workspace was made from."""
    git_status: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    """What the pull before the run did (``up to date``, ``pulled <commit>``, or why not)."""
    result: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    structured_output: Any = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    cost_usd: float | None = None
    usage: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    num_turns: int | None = None
    duration_ms: int | None = None
    cancel_requested: bool = False
    worker: str | None = Field(default=None, max_length=64)
    heartbeat_at: datetime | None = _ts(nullable=True)
    created_at: datetime = _ts(nullable=False, default=utcnow)
    queued_at: datetime | None = _ts(nullable=True, index=True)
    started_at: datetime | None = _ts(nullable=True)
    finished_at: datetime | None = _ts(nullable=True)
