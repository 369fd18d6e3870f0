"""Request and response bodies of the batch resources: registered repositories (shapes of
Claude Batch Server's repository API) and MCP profiles (claude-code-ops' ``/api/mcp-profiles``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gateway.db.models import McpProfile, Repository, RepositoryStatus, as_utc


class RepositoryCreate(BaseModel):
    """``POST /repositories``: register a git repository; it is cloned in the background."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, description="unique among your repositories")
    git_url: str = Field(
        min_length=1,
        max_length=2048,
        description="https://…, ssh://… or user@host:path, file:///… (inside "
        "CCGATE_REPO_FILE_ROOTS), http://… (when CCGATE_REPO_ALLOW_HTTP)",
    )
    branch: str | None = Field(
        default=None, max_length=255, description="default: the remote's default branch"
    )
    description: str | None = Field(default=None, max_length=10_000)
    deploy_key: str | None = Field(
        default=None,
        max_length=20_000,
        description="SSH private key for an ssh URL; stored encrypted, never returned",
    )


class RepositoryHead(BaseModel):
    """The clone's checked-out commit."""

    branch: str | None
    commit: str | None
    date: datetime | None = Field(description="committer date, UTC")
    subject: str | None


class RepositoryPublic(BaseModel):
    """A registered repository as its owner sees it (the deploy key never appears)."""

    id: str
    name: str
    git_url: str
    branch: str | None
    description: str | None
    status: RepositoryStatus = Field(description="cloning → ready | failed")
    pulling: bool = Field(description="a pull is running (the clone stays usable)")
    error: str | None = Field(description="why the clone failed, or why the last pull failed")
    head: RepositoryHead
    size_bytes: int | None = Field(description="working tree and .git on disk")
    has_deploy_key: bool
    created_at: datetime
    updated_at: datetime
    pulled_at: datetime | None = Field(description="last successful clone or pull")

    @classmethod
    def of(cls, repo: Repository) -> RepositoryPublic:
        """The public view of a row."""
        return cls(
            id=repo.id,
            name=repo.name,
            git_url=repo.git_url,
            branch=repo.branch,
            description=repo.description,
            status=repo.status,
            pulling=repo.pulling,
            error=repo.error,
            head=RepositoryHead(
                branch=repo.head_branch,
                commit=repo.head_commit,
                date=as_utc(repo.head_date),
                subject=repo.head_subject,
            ),
            size_bytes=repo.size_bytes,
            has_deploy_key=repo.deploy_key is not None,
            created_at=as_utc(repo.created_at) or repo.created_at,
            updated_at=as_utc(repo.updated_at) or repo.updated_at,
            pulled_at=as_utc(repo.pulled_at),
        )


class RepositoryList(BaseModel):
    """``GET /repositories`` answer."""

    repositories: list[RepositoryPublic]
    total: int
    limit: int
    offset: int


class McpProfileBody(BaseModel):
    """``POST /mcp-profiles`` and ``PUT /mcp-profiles/{name}``: a named set of MCP servers."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, description="unique among your profiles")
    description: str | None = Field(default=None, max_length=10_000)
    servers: dict[str, dict[str, Any]] = Field(
        description="Claude Code --mcp-config entries by server name: stdio "
        "{command, args?, env?} or {type: http|sse, url, headers?}; env and headers values "
        "are stored encrypted and never returned"
    )


class McpProfilePublic(BaseModel):
    """A profile as its owner sees it: servers without their env / headers values."""

    id: str
    name: str
    description: str | None
    servers: dict[str, dict[str, Any]]
    secret_keys: dict[str, dict[str, list[str]]] = Field(
        description="{server: {env|headers: [names]}} whose values are stored encrypted"
    )
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, profile: McpProfile) -> McpProfilePublic:
        """The public view of a row."""
        from gateway.services.mcp_profiles import SECRET_FIELDS, secret_keys

        servers = {
            name: {k: v for k, v in config.items() if k not in SECRET_FIELDS}
            for name, config in profile.servers.items()
        }
        return cls(
            id=profile.id,
            name=profile.name,
            description=profile.description,
            servers=servers,
            secret_keys=secret_keys(profile),
            created_at=as_utc(profile.created_at) or profile.created_at,
            updated_at=as_utc(profile.updated_at) or profile.updated_at,
        )


class McpProfileList(BaseModel):
    """``GET /mcp-profiles`` answer."""

    profiles: list[McpProfilePublic]
    total: int
    limit: int
    offset: int
