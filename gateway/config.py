"""Gateway settings from the environment (pydantic-settings), with embedded defaults.

Every field reads ``CCGATE_<NAME>``; the conventional ``DATABASE_URL`` and ``REDIS_URL`` are also
accepted. Defaults run a single-machine gateway: SQLite under ``data_dir``, Redis on localhost,
artifacts in a local directory (set ``CCGATE_S3_ENDPOINT`` for S3/MinIO), Docker from
``DOCKER_HOST`` or the default socket.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import secrets
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from gateway.auth.secret_box import SecretBox
from gateway.batch_config import BatchSettings
from gateway.services.admission import Limits
from gateway.services.metering.prices import ModelPrice


class Environment(StrEnum):
    """Deployment mode."""

    DEVELOPMENT = "development"  # a JWT secret file is generated on first use
    PRODUCTION = "production"  # CCGATE_JWT_SECRET must be set explicitly


def _default_data_dir() -> Path:
    return Path.home() / ".ccgate"


class PoolProfile(BaseModel):
    """One warm pool: containers started ahead of need with this session config.

    ``config`` holds SessionConfig fields (model, permission_mode, allowed_tools,
    disallowed_tools, system_prompt, append_system_prompt, mcp_servers, max_turns,
    include_partial_messages, env); what is not given takes the deployment's default, exactly
    as a create would resolve it. A create whose resolved config launches the same CLI claims a
    container from the pool. The pool keeps ``min_size`` ready containers, and up to
    ``max_size`` while claims are frequent (one more per claim in the last minute)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    min_size: int = Field(default=1, ge=0, le=200)
    max_size: int = Field(default=0, ge=0, le=200)
    """0: same as ``min_size``."""
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _sizes(self) -> PoolProfile:
        if self.max_size == 0:
            self.max_size = self.min_size
        if self.max_size < self.min_size:
            raise ValueError(f"warm pool {self.name}: max_size is below min_size")
        return self


class Settings(BatchSettings):
    """All gateway configuration; see README "Configuration" for the table."""

    model_config = SettingsConfigDict(env_prefix="CCGATE_", extra="ignore")

    environment: Environment = Environment.DEVELOPMENT
    data_dir: Path = Field(default_factory=_default_data_dir)
    host: str = "127.0.0.1"
    port: int = 8000

    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("CCGATE_DATABASE_URL", "DATABASE_URL")
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("CCGATE_REDIS_URL", "REDIS_URL"),
    )
    container_redis_host: str | None = None
    """Host:port the session containers use for Redis; default: REDIS_URL's, with a loopback
    host replaced by ``host.docker.internal``."""
    session_redis_acl: bool = True
    """Give each container its own Redis ACL user limited to its session's keys and channels."""

    s3_endpoint: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: SecretStr | None = None
    s3_bucket: str = "ccgate-artifacts"
    s3_secure: bool = False
    s3_region: str | None = None
    artifacts_dir: Path | None = None
    max_artifact_bytes: int = 100 * 1024 * 1024

    secrets_key: SecretStr | None = None
    """Key for secrets at rest (deploy keys); default: derived from the JWT secret."""

    jwt_secret: SecretStr | None = None
    jwt_secret_file: Path | None = None
    token_ttl_s: int = 24 * 3600

    deployment: str | None = None
    """Name stamped on this deployment's containers and volumes (label ccgate.deployment); the
    reaper touches nothing else. Default: derived from the database and Redis URLs, so replicas
    agree and two deployments sharing a Docker engine never reap each other."""
    docker_host: str | None = None
    """Docker engine URL; default: DOCKER_HOST or the local socket."""
    image: str = "ccgate-session:latest"
    docker_network: str = "ccgate-sessions"
    egress_proxy_bin: str = "tinyproxy"
    """The forward proxy of ``allowlist`` sessions (Debian's tinyproxy 1.11)."""
    egress_ports: str = Field(default="30000-30999", pattern=r"^\d{1,5}-\d{1,5}$")
    """Host ports the egress proxies listen on (the firewall lets containers reach them)."""
    egress_connect_ports: list[int] = Field(default_factory=lambda: [443, 80])
    """Ports an allowlist session may open through its proxy (CONNECT and plain HTTP)."""
    egress_host: str = "host.docker.internal"
    """How containers reach the egress proxies (the host, like the gateway)."""
    sessions_network_internal: bool = True
    """Make the sessions network internal: no route out through Docker's NAT."""
    sessions_firewall: Literal["auto", "on", "off"] = "auto"
    """Host iptables rules limiting session containers to the gateway and Redis: ``on``
    (required: sessions fail with 503 without it), ``auto`` (when root and iptables allow),
    ``off``."""
    container_memory: str = "2g"
    container_cpus: float = Field(default=2.0, gt=0)
    """A ceiling, in cores (CFS quota): a runaway agent cannot take more, an idle host still
    lets the CLI's boot use two threads (with 1.0 a cold start is ~30% slower here)."""
    container_pids: int = 512
    container_nofile: int = Field(default=4096, ge=256, le=1_048_576)
    """Open files per session container (soft and hard limit)."""
    container_runtime: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """OCI runtime of session containers (e.g. ``runsc`` for gVisor; it must be registered
    with Docker); default: Docker's own (runc)."""
    container_tmp_mib: int = Field(default=512, ge=16)
    """Size of a session container's /tmp (tmpfs; the root filesystem is read-only)."""
    container_home_mib: int = Field(default=256, ge=16)
    """Size of the CLI user's home (tmpfs; its .claude is the config volume)."""
    container_state_mib: int = Field(default=256, ge=16)
    """Size of the wrapper's private state (tmpfs: the outbox of events Redis has not taken)."""
    container_extra_hosts: dict[str, str] = Field(
        default_factory=lambda: {"host.docker.internal": "host-gateway"}
    )
    stop_timeout_s: int = 15
    stop_record_timeout_s: float = 30.0
    """How long a stop waits for the ledger to record the last turn (and copy its files)
    before the container is removed."""
    reaper_interval_s: float = 15.0
    reaper_grace_s: float = 45.0
    """A live session whose container is gone (and whose death the event stream did not
    report) is closed as crashed only after this long without activity."""
    session_idle_timeout_s: int = Field(default=900, ge=0)
    """Seconds an idle session keeps its container before it is paused (0: never); a
    session's ``config.idle_timeout_s`` overrides it."""
    session_max_lifetime_s: int = Field(default=86_400, ge=0)
    """Seconds after creation a session is stopped, busy or not (0: unlimited); a session's
    ``config.max_lifetime_s`` may only shorten it."""
    lifecycle_interval_s: float = Field(default=2.0, gt=0)
    """Period of the lifecycle loop: idle pauses, lifetimes, resumes of paused sessions with
    prompts waiting, interrupts that were ignored, silent turns."""
    max_crash_resumes: int = Field(default=3, ge=0)
    """Container deaths in a row (no completed turn between them) a session survives by
    pausing; one more fails it."""
    crash_restart: Literal["on_demand", "always"] = "on_demand"
    """After a container death: resume when a prompt is waiting or arrives (``on_demand``),
    or at once (``always``, within ``max_crash_resumes``)."""
    interrupt_grace_s: float = Field(default=10.0, gt=0, le=300)
    """After an interrupt the CLI has this long to end the turn before the wrapper kills it;
    the gateway kills the container if the turn is still open 5 s after that."""
    max_live_sessions: int = Field(default=200, ge=0)
    """Live sessions (each with a container) in the whole deployment (0: no limit)."""
    max_live_sessions_per_user: int = Field(default=20, ge=0)
    """Live sessions of one user (0: no limit); paused and queued ones do not count."""
    max_active_turns_per_user: int = Field(default=200, ge=0)
    """Queued + running prompts of one user over all sessions (0: no limit)."""
    host_memory_reserve_mib: int = Field(default=1024, ge=0)
    """No container is started while the host's available memory is below this (0: off)."""
    admission_retry_after_s: int = Field(default=5, ge=1)
    """The Retry-After of an admission refusal (429)."""
    warm_pool: list[PoolProfile] = Field(default_factory=list)
    """Warm pools (JSON list of PoolProfile: ``[{"name": "default", "min_size": 4,
    "max_size": 8, "config": {}}]``); empty: every session starts cold."""
    warm_pool_refill_concurrency: int = Field(default=2, ge=1, le=32)
    """Pool containers started at once (per deployment: one replica refills, under a lease)."""
    warm_pool_ready_timeout_s: float = Field(default=60.0, gt=0)
    """A pool container whose CLI is not ready in this time is discarded."""
    network_sandboxes: int = Field(default=2, ge=0, le=32)
    """Network sandboxes kept ready per sessions network (services/net_sandboxes.py): a
    container joins one instead of setting up a network of its own at start; 0: off. Used
    with the engine's default runtime only."""
    turn_silence_s: float = Field(default=600.0, gt=0)
    """A running turn with no event for this long is flagged (``turn_silent`` notice, metric)."""
    stream_maxlen: int = 10_000
    """Events kept per session in the Redis Stream once persisted (the ledger trims below its
    persisted watermark; an unpersisted event is never trimmed)."""
    ledger_max_attempts: int = 5
    """Failures of one stream entry (other than an outage) before it is dead-lettered."""
    collector_workers: int = 4
    """Concurrent artifact collections."""
    docker_threads: int = 16
    """Threads for blocking docker SDK calls (a dedicated pool)."""
    storage_threads: int = 8
    """Threads for blocking S3 and file calls (a dedicated pool)."""
    db_pool_size: int = 10
    db_max_overflow: int = 20
    db_pool_timeout_s: float = 10.0
    """How long a request waits for a free database connection before 503."""
    redis_socket_timeout_s: float = 10.0
    """Read/write timeout of the gateway's Redis connections (blocking reads stay below it)."""
    log_format: str = "text"
    """``text`` or ``json`` (one JSON object per line, with the request id)."""
    log_level: str = "INFO"
    ledger_claim_idle_s: float = 30.0
    """A replica takes over ledger entries another one left unacknowledged this long."""

    max_spawn_depth: int = 5
    """Deepest allowed session (the root is depth 0)."""
    max_children_per_session: int = 10
    """Live children one session may have at once."""
    max_live_sessions_per_tree: int = 20
    max_sessions_per_tree: int = 100
    """Sessions ever created in one tree, root included (the fan-out budget)."""
    tree_budget_usd: float | None = None
    """Cost budget of a tree when its root does not set config.max_budget_usd."""
    container_gateway_url: str | None = None
    """How session containers reach the gateway (ccgate MCP tools); default
    ``http://host.docker.internal:<port>``. The gateway must listen where containers reach it."""
    session_token_ttl_s: int = 3600
    callback_allowed_networks: list[str] = Field(default_factory=list)
    """CIDRs that spawn callbacks may reach although they are loopback, private or link-local
    (e.g. ``["10.20.0.0/16"]`` for an internal webhook receiver); default: public addresses only.
    In the environment: a JSON list."""

    anthropic_base_url: str | None = None
    """The upstream Messages API the model proxy forwards to (default api.anthropic.com).
    Only the gateway calls it: containers reach the model through the proxy."""
    anthropic_api_key: SecretStr | None = None
    """Upstream API key, injected by the proxy as ``x-api-key``; never given to a container."""
    anthropic_auth_token: SecretStr | None = None
    """Upstream OAuth/bearer token (instead of the API key), injected as ``Authorization``."""
    proxy_max_request_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    """Largest request body the model proxy forwards (the Messages API's own limit is 32 MB)."""
    proxy_max_response_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest non-streaming upstream response the proxy reads."""
    proxy_connect_timeout_s: float = 10.0
    proxy_read_timeout_s: float = 600.0
    """Longest silence from upstream within one response (streams ping every few seconds)."""
    proxy_max_connections: int = 256
    proxy_credential_cache_s: float = Field(default=1.0, ge=0, le=60)
    """How long a replica trusts a resolved session credential before asking the database
    again (an ended session's credential is refused within this time; 0: every request)."""
    proxy_reserve_output_tokens: int = Field(default=8192, ge=1)
    """Output tokens a request's reservation assumes (capped by its max_tokens)."""
    session_budget_usd: float | None = Field(default=None, gt=0)
    """Default cost budget of each session (config.session_budget_usd overrides it)."""
    user_daily_budget_usd: float | None = Field(default=None, gt=0)
    """Cost budget of each user per UTC day, over all their sessions."""
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024)
    """Largest API request body and WebSocket message (a 1,000,000-character prompt fits);
    longer ones are refused with 413 (WebSocket: closed with 1009)."""
    rate_limit: str = "600/minute;60/second"
    """Per-user request limits over every replica (``limits`` notation: "N/second|minute|hour",
    several separated by ';'; empty: none). Each API request and WebSocket prompt counts."""
    operators: list[str] = Field(default_factory=list)
    """Users (token subjects) who may read any user's usage (JSON list in the environment)."""
    prices: dict[str, ModelPrice] = Field(default_factory=dict)
    """Price overrides by model id prefix, USD per million tokens (JSON in the environment:
    ``{"claude-sonnet-4": {"input": 3, "output": 15}}``); merged over the built-in table."""
    default_model: str = "claude-sonnet-4-5"
    default_permission_mode: str = "bypassPermissions"
    default_chat_timeout_s: float = 600.0

    @model_validator(mode="after")
    def _pool_names_unique(self) -> Settings:
        names = [p.name for p in self.warm_pool]
        if len(names) != len(set(names)):
            raise ValueError("CCGATE_WARM_POOL: profile names must be unique")
        return self

    @model_validator(mode="after")
    def _production_needs_secret(self) -> Settings:
        if self.environment is Environment.PRODUCTION and self.jwt_secret is None:
            raise ValueError("CCGATE_JWT_SECRET must be set when CCGATE_ENVIRONMENT=production")
        return self

    @model_validator(mode="after")
    def _rate_limit_parses(self) -> Settings:
        from limits import parse_many

        if self.rate_limit.strip():
            try:
                parse_many(self.rate_limit)
            except ValueError as exc:
                raise ValueError(f"CCGATE_RATE_LIMIT: {exc}") from exc
        return self

    @cached_property
    def callback_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """``callback_allowed_networks`` parsed."""
        return [ipaddress.ip_network(c, strict=False) for c in self.callback_allowed_networks]

    @model_validator(mode="after")
    def _networks_parse(self) -> Settings:
        for cidr in self.callback_allowed_networks:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"CCGATE_CALLBACK_ALLOWED_NETWORKS: {exc}") from exc
        return self

    @cached_property
    def db_url(self) -> str:
        """SQLAlchemy async URL: SQLite (aiosqlite) by default, PostgreSQL through asyncpg."""
        url = self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'ccgate.db'}"
        for plain in ("postgresql://", "postgres://"):
            if url.startswith(plain):
                url = "postgresql+asyncpg://" + url[len(plain) :]
        if url.startswith("sqlite://"):
            url = "sqlite+aiosqlite://" + url[len("sqlite://") :]
        return url

    @cached_property
    def deployment_id(self) -> str:
        """The deployment label value (see ``deployment``)."""
        if self.deployment:
            return self.deployment
        return hashlib.sha256(f"{self.db_url}|{self.redis_url}".encode()).hexdigest()[:16]

    @cached_property
    def repos_path(self) -> Path:
        """Directory of the registered repositories' clones."""
        return self.repos_dir or self.data_dir / "repositories"

    @cached_property
    def jobs_path(self) -> Path:
        """Directory of the job workspaces and uploads."""
        return self.jobs_dir or self.data_dir / "jobs"

    @cached_property
    def artifacts_path(self) -> Path:
        """Directory of the local artifact store (used when no S3 endpoint is set)."""
        return self.artifacts_dir or self.data_dir / "artifacts"

    def container_redis_url(self, username: str | None, password: str | None) -> str:
        """Redis URL for a session container, logging in as ``username`` when given."""
        parts = urlsplit(self.redis_url)
        if self.container_redis_host:
            hostport = self.container_redis_host
        else:
            host = parts.hostname or "127.0.0.1"
            if host in ("127.0.0.1", "localhost", "::1"):
                host = "host.docker.internal"
            hostport = f"{host}:{parts.port or 6379}"
        if username is not None:
            auth = f"{username}:{password}@"
        elif parts.password:
            auth = f"{parts.username or ''}:{parts.password}@"
        else:
            auth = ""
        return urlunsplit((parts.scheme, auth + hostport, parts.path or "/0", "", ""))

    @property
    def egress_port_range(self) -> tuple[int, int]:
        """``egress_ports`` as (low, high)."""
        low, high = (int(p) for p in self.egress_ports.split("-"))
        return low, high

    @property
    def model_upstream_url(self) -> str:
        """Where the model proxy forwards Messages API calls."""
        return (self.anthropic_base_url or "https://api.anthropic.com").rstrip("/")

    def model_proxy_url_for_containers(self) -> str:
        """``ANTHROPIC_BASE_URL`` of a session container: the gateway's model proxy."""
        return self.gateway_url_for_containers().rstrip("/") + "/model"

    def gateway_url_for_containers(self) -> str:
        """Base URL the ccgate MCP tools inside containers call."""
        return self.container_gateway_url or f"http://host.docker.internal:{self.port}"

    def admission_limits(self) -> Limits:
        """The admission limits (services/admission.py)."""
        return Limits(
            max_live=self.max_live_sessions,
            max_live_per_user=self.max_live_sessions_per_user,
            max_active_turns_per_user=self.max_active_turns_per_user,
            memory_reserve_mib=self.host_memory_reserve_mib,
            retry_after_s=self.admission_retry_after_s,
        )

    def secret_box(self) -> SecretBox:
        """The box for secrets at rest: CCGATE_SECRETS_KEY, else derived from the JWT key."""
        secret = self.secrets_key.get_secret_value() if self.secrets_key else self.jwt_key()
        return _box(secret)

    def jwt_key(self) -> str:
        """The HS256 signing key: CCGATE_JWT_SECRET, else a secret file created on first use."""
        if self.jwt_secret is not None:
            return self.jwt_secret.get_secret_value()
        path = self.jwt_secret_file or self.data_dir / "jwt-secret"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(48))
        return path.read_text().strip()


@functools.lru_cache(maxsize=8)
def _box(secret: str) -> SecretBox:
    """One SecretBox per secret (deriving its key costs an HKDF)."""
    return SecretBox(secret)
