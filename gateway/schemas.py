"""Request and response bodies of the HTTP API (a superset of CC-Docker's shapes)."""

from __future__ import annotations

import json
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from gateway.db.models import WorkspaceType

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_ENV = frozenset(
    {"HOME", "PATH", "USER", "CLAUDE_CONFIG_DIR", "CLAUDECODE", "PYTHONPATH", "LD_PRELOAD"}
)
_TOOL_RULE = re.compile(r"^[A-Za-z0-9_.*:-]+(\(.{0,500}\))?$")


def _not_blank(prompt: str) -> str:
    if not prompt.strip():
        raise ValueError("prompt must contain non-whitespace text")
    return prompt


Prompt = Annotated[str, Field(min_length=1, max_length=1_000_000), AfterValidator(_not_blank)]
"""A prompt for the CLI: 1 byte to 1 MB, not only whitespace."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PermissionMode(StrEnum):
    """The CLI's ``--permission-mode`` choices (2.1.x; ``default`` is an alias of ``manual``)."""

    DEFAULT = "default"
    MANUAL = "manual"
    ACCEPT_EDITS = "acceptEdits"
    PLAN = "plan"
    BYPASS = "bypassPermissions"
    DONT_ASK = "dontAsk"
    AUTO = "auto"


class WorkspaceSpec(_Strict):
    """``{type: ephemeral|persistent, id?}``; a persistent workspace needs an ``id``."""

    type: WorkspaceType = WorkspaceType.EPHEMERAL
    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

    @field_validator("type")
    @classmethod
    def _root_types(cls, value: WorkspaceType) -> WorkspaceType:
        if value not in (WorkspaceType.EPHEMERAL, WorkspaceType.PERSISTENT):
            raise ValueError("a session's workspace type is 'ephemeral' or 'persistent'")
        return value

    @model_validator(mode="after")
    def _id_matches_type(self) -> WorkspaceSpec:
        if self.type is WorkspaceType.PERSISTENT and not self.id:
            raise ValueError("a persistent workspace needs an id (letters, digits, '_', '.', '-')")
        if self.type is WorkspaceType.EPHEMERAL and self.id:
            raise ValueError("an ephemeral workspace takes no id; use type 'persistent'")
        return self


_DOMAIN = re.compile(
    r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
)


class EgressConfig(_Strict):
    """Where a session's container may connect besides the gateway: ``none`` (default: nowhere),
    ``allowlist`` (these domains, through a forward proxy; ``*.example.com`` includes
    subdomains) or ``open`` (the internet, but no private, loopback or link-local address and
    no port of the host but the gateway's and Redis's)."""

    policy: Literal["none", "allowlist", "open"] = "none"
    domains: list[str] = Field(default_factory=list, max_length=100)

    @field_validator("domains")
    @classmethod
    def _domains(cls, domains: list[str]) -> list[str]:
        out = []
        for domain in domains:
            name = domain.strip().lower().rstrip(".")
            if len(name) > 253 or not _DOMAIN.match(name):
                raise ValueError(f"{domain!r} is not a domain name (or *.domain)")
            out.append(name)
        return out

    @model_validator(mode="after")
    def _allowlist_has_domains(self) -> EgressConfig:
        if self.policy == "allowlist" and not self.domains:
            raise ValueError("an allowlist needs at least one domain")
        if self.policy != "allowlist" and self.domains:
            raise ValueError("domains are only for policy 'allowlist'")
        return self


JSON_SCHEMA_MAX_BYTES = 64 * 1024


def check_json_schema(schema: dict[str, Any]) -> None:
    """Raise ValueError unless ``schema`` is a JSON Schema (draft 2020-12 meta-schema) of at
    most :data:`JSON_SCHEMA_MAX_BYTES` serialised."""
    try:
        if len(json.dumps(schema)) > JSON_SCHEMA_MAX_BYTES:
            raise ValueError(f"json_schema is larger than {JSON_SCHEMA_MAX_BYTES} bytes")
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"json_schema is not a valid JSON Schema: {exc.message}") from exc
    except RecursionError:
        raise ValueError("json_schema is nested too deeply") from None


class SessionConfig(_Strict):
    """How the session's CLI runs; every field is passed to the Claude Code CLI."""

    model: str | None = Field(default=None, min_length=1, max_length=200)
    system_prompt: str | None = Field(default=None, max_length=100_000)
    append_system_prompt: str | None = Field(default=None, max_length=100_000)
    allowed_tools: list[str] = Field(default_factory=list, max_length=200)
    disallowed_tools: list[str] = Field(default_factory=list, max_length=200)
    permission_mode: PermissionMode | None = None
    max_turns: int | None = Field(default=None, ge=1, le=10_000)
    max_budget_usd: float | None = Field(default=None, gt=0)
    """Cost budget (USD) of the tree this root starts, enforced by the model proxy over every
    session of the tree; ignored on children."""
    session_budget_usd: float | None = Field(default=None, gt=0)
    """Cost budget (USD) of this session alone, enforced by the model proxy."""
    timeout_seconds: float | None = Field(default=None, gt=0, le=86_400)
    json_schema: dict[str, Any] | None = None
    """Structured output: a JSON Schema (≤ 64 KiB) the CLI's result must conform to
    (``--json-schema``); the result text is then that JSON."""
    mcp_servers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    mcp_profiles: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]] = Field(
        default_factory=list, max_length=10
    )
    """Names of your MCP profiles whose servers join ``mcp_servers`` (secrets included)."""
    env: dict[str, str] = Field(default_factory=dict)
    include_partial_messages: bool = False
    egress: EgressConfig = Field(default_factory=EgressConfig)
    idle_timeout_s: int | None = Field(default=None, ge=0, le=30 * 86_400)
    """Seconds idle before the container is paused (0: never; default: the deployment's)."""
    max_lifetime_s: int | None = Field(default=None, ge=1, le=365 * 86_400)
    """Seconds after creation the session is stopped (at most the deployment's maximum)."""
    """Network egress of the session's container (SECURITY.md)."""

    @field_validator("allowed_tools", "disallowed_tools")
    @classmethod
    def _tool_rules(cls, rules: list[str]) -> list[str]:
        for rule in rules:
            if not _TOOL_RULE.match(rule):
                raise ValueError(f"{rule!r} is not a tool rule such as 'Read' or 'Bash(git *)'")
        return rules

    @field_validator("json_schema")
    @classmethod
    def _json_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            check_json_schema(schema)
        return schema

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for name, value in env.items():
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
            if name in RESERVED_ENV or name.upper().startswith("CCGATE_"):
                raise ValueError(f"{name} is reserved by ccgate and cannot be set")
            if "\x00" in value:
                raise ValueError(f"the value of {name} contains a NUL byte")
        return env


class SessionCreate(_Strict):
    """``POST /sessions`` body."""

    workspace: WorkspaceSpec = Field(default_factory=WorkspaceSpec)
    config: SessionConfig = Field(default_factory=SessionConfig)
    parent_session_id: str | None = Field(default=None, max_length=36)
    queue: bool = False
    """Over an admission limit, wait in the queue (status ``queued``) instead of a 429."""


class SpawnWorkspace(_Strict):
    """``{type: inherit|clone|ephemeral}``."""

    type: WorkspaceType = WorkspaceType.EPHEMERAL

    @field_validator("type")
    @classmethod
    def _child_types(cls, value: WorkspaceType) -> WorkspaceType:
        if value is WorkspaceType.PERSISTENT:
            raise ValueError(
                "a spawned child's workspace type is 'inherit', 'clone' or 'ephemeral'"
            )
        return value


class SpawnRequest(_Strict):
    """``POST /sessions/{id}/spawn`` body; config fields not given are inherited."""

    prompt: Prompt
    workspace: SpawnWorkspace = Field(default_factory=SpawnWorkspace)
    config: SessionConfig = Field(default_factory=SessionConfig)
    callback: AnyHttpUrl | None = None
    """Receives a POST of each of the child's turn results (JSON, like the child_result event)."""

    @field_validator("callback")
    @classmethod
    def _callback_length(cls, url: AnyHttpUrl | None) -> AnyHttpUrl | None:
        if url is not None and len(str(url)) > 2000:
            raise ValueError("callback URL must be at most 2000 characters")
        return url


class SpawnCreated(BaseModel):
    """``POST /sessions/{id}/spawn`` answer (CC-Docker's shape)."""

    child_session_id: str
    status: str
    parent_session_id: str
    depth: int
    container_id: str | None


class WaitRequest(_Strict):
    """``POST /sessions/{id}/wait`` body."""

    timeout_seconds: float = Field(default=600, gt=0, le=86_400)


class WorkspacePublic(BaseModel):
    """A session's workspace: ephemeral, persistent (with its id), inherit or clone."""

    type: str
    id: str | None = None


class SessionCreated(BaseModel):
    """``POST /sessions`` answer."""

    session_id: str
    status: str
    container_id: str | None
    created_at: datetime
    websocket_url: str
    queue_position: int | None = None
    """With ``queue``: the session's place in the admission queue (status ``queued``)."""


class SessionPublic(BaseModel):
    """A session as the API shows it."""

    session_id: str
    status: str
    container_id: str | None
    created_at: datetime
    last_activity: datetime
    parent_session_id: str | None
    child_session_ids: list[str]
    total_cost_usd: float
    total_turns: int
    usage: dict[str, Any]
    workspace: WorkspacePublic
    depth: int
    root_session_id: str
    config: dict[str, Any]
    cli_session_id: str | None
    error: str | None
    paused_reason: str | None = None
    """Why the session is (or was last) paused: idle, requested, oom, killed, exited, crashed."""
    idle_timeout_s: int | None
    """Seconds idle before the container is paused (0: never; None: the deployment's default)."""
    expires_at: datetime | None
    """When the session's maximum lifetime ends (it is then stopped); None: unlimited."""
    queue_position: int | None = None
    """1-based place in the admission queue while it waits for room; None otherwise."""


class SessionList(BaseModel):
    """``GET /sessions`` answer."""

    sessions: list[SessionPublic]
    total: int
    limit: int
    offset: int


class ChatRequest(_Strict):
    """``POST /sessions/{id}/chat`` body. ``timeout_seconds`` bounds the turn (the wrapper
    interrupts it when exceeded) and, with ``stream=false``, the wait for its result."""

    prompt: Prompt
    stream: bool = True
    timeout_seconds: float | None = Field(default=None, gt=0, le=86_400)
    queue: bool = False
    """A paused session that cannot resume now (admission limit): keep the prompt queued
    and resume when room frees, instead of a 429."""


class ChatAccepted(BaseModel):
    """``202`` answer to a streamed chat: follow the session's stream for ``message_id``."""

    message_id: str
    status: Literal["processing"] = "processing"


class ChatResult(BaseModel):
    """Answer to ``stream=false``: the turn's result (fields of the CLI's ``result`` event)."""

    message_id: str
    type: Literal["result"] = "result"
    status: str
    subtype: str | None
    is_error: bool
    result: str | None
    errors: list[str] | None
    duration_ms: int | None
    num_turns: int | None
    total_cost_usd: float | None
    cost_usd: float | None
    usage: dict[str, Any] | None
    outcome: str | None = None
    """How the turn ended: completed, error, interrupted, timeout, killed, oom, exited (none
    for a cancelled turn)."""
    terminal_reason: str | None = None


class MessagePublic(ChatResult):
    """``GET /sessions/{id}/messages/{message_id}``."""

    type: Literal["result"] = "result"
    session_id: str
    prompt: str
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None


class ArtifactPublic(BaseModel):
    """A collected workspace file."""

    path: str
    size: int
    sha256: str
    content_type: str
    turn_id: str | None
    updated_at: datetime


class ArtifactList(BaseModel):
    """``GET /sessions/{id}/artifacts``."""

    session_id: str
    artifacts: list[ArtifactPublic]


class Check(BaseModel):
    """One dependency's health."""

    ok: bool
    detail: str


class HealthPublic(BaseModel):
    """``GET /health`` and ``/health/ready``.

    ``status``, ``version`` and ``components`` are CC-Docker's health shape (its values
    ``healthy``/``unhealthy``, per component too); ``checks`` carries ccgate's detail per
    dependency; ``ready`` is CC-Docker's readiness answer (also on ``/health``)."""

    status: Literal["healthy", "unhealthy"]
    version: str
    ready: bool
    components: dict[str, Literal["healthy", "unhealthy"]]
    checks: dict[str, Check]


class LivePublic(BaseModel):
    """``GET /health/live`` (CC-Docker's shape)."""

    alive: bool


class ServiceInfo(BaseModel):
    """``GET /`` and ``GET /api/v1``: what this service is and where its routes are.

    ``version`` is the service's release on ``/`` and the API version (``v1``) on
    ``/api/v1``, as in CC-Docker; ``service_version`` is always the release."""

    name: str
    version: str
    service_version: str
    docs: str
    openapi: str
    endpoints: dict[str, str]


class ChildrenList(BaseModel):
    """``GET /sessions/{id}/children``."""

    session_id: str
    children: list[SessionPublic]


class UsageCounters(BaseModel):
    """Tokens and cost metered by the model proxy (USD; tokens as the Messages API counts)."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0


class UsageDayPublic(UsageCounters):
    """One user's usage on one UTC day."""

    day: str


class UsageReport(BaseModel):
    """``GET /usage``: a user's metered usage per UTC day, newest first, with the total and
    the daily budget (null when unlimited)."""

    user: str
    days: list[UsageDayPublic]
    total: UsageCounters
    daily_budget_usd: float | None


class ModelRequestPublic(BaseModel):
    """One Messages API request of a session, as the model proxy metered it."""

    request_id: str
    turn_id: str | None
    model: str
    stream: bool
    status_code: int
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cost_usd: float
    complete: bool
    error: str | None
    started_at: datetime
    duration_ms: int


class SessionUsage(BaseModel):
    """``GET /sessions/{id}/usage``: the session's metered requests (oldest first, paged by
    ``limit``), its totals and its budget."""

    session_id: str
    total: UsageCounters
    budget_usd: float | None
    requests: list[ModelRequestPublic]


class ErrorBody(BaseModel):
    """Every error the API answers: ``detail`` says what to fix, ``code`` is stable for
    programs (``bad_request``, ``unauthorized``, ``forbidden``, ``not_found``, ``conflict``,
    ``spawn_refused``, ``invalid_request``, ``callback_refused``, ``request_too_large``,
    ``rate_limited``, ``turn_timeout``, ``dependency_unavailable``, ``container_start_failed``,
    ``internal_error``); ``error_id`` ties a 500 to its log line; ``errors`` lists each field a
    422 refused (``loc``, ``msg``, ``type``)."""

    detail: str
    code: str
    error_id: str | None = None
    errors: list[dict[str, Any]] | None = None


def _error_doc(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


API_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error_doc("The body is not parsable (malformed JSON)"),
    401: _error_doc("No valid bearer token (WWW-Authenticate: Bearer)"),
    403: _error_doc("A session token asked for something outside its subtree"),
    404: _error_doc("No such session (or resource) for this caller"),
    409: _error_doc("The session's state forbids it, or a spawn limit would be exceeded"),
    413: _error_doc("Request body over CCGATE_MAX_REQUEST_BYTES"),
    422: _error_doc("Invalid input: each refused field in ``errors``"),
    429: _error_doc("The user's rate limit is spent (Retry-After says when to retry)"),
    500: _error_doc("A bug: ``error_id`` is in the gateway's log"),
    503: _error_doc("A dependency (database, redis, storage, docker, firewall) is down"),
    504: _error_doc("A synchronous wait ran out of time (the turn keeps running)"),
}
"""The error responses every /api/v1 route declares in the OpenAPI document."""
