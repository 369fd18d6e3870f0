"""Provisioning: the Redis spec, token and ACL user, the volumes and the container of a session,
and their removal (all-or-nothing on create)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from urllib.parse import urlsplit

from sqlmodel import col, delete
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.auth import mint_token
from gateway.config import Settings
from gateway.db.models import (
    Session,
    SpawnTree,
    Turn,
    WorkspaceType,
)
from gateway.errors import (
    GatewayError,
)
from gateway.services import session_redis, tree
from gateway.services.mcp_profiles import sealed_servers
from gateway.services.network import open_network
from gateway.services.runtime import ContainerSpec, VolumeMount
from gateway.services.runtime.base import (
    LABEL_OWNER,
    LABEL_SESSION,
    LABEL_WORKSPACE,
    WRAPPER_CAPS,
    session_tmpfs,
)
from gateway.services.session_base import ServiceBase
from wrapper.launch import SPEC_ENV
from wrapper.protocol import SessionSpec

CONFIG_MOUNT = "/home/claude/.claude"
WORKSPACE_MOUNT = "/workspace"


def workspace_volume_name(owner: str, ws_type: str, ws_id: str | None, sid: str) -> str:
    """Docker volume of a workspace; persistent ones are namespaced by a hash of the owner."""
    if ws_type == WorkspaceType.PERSISTENT and ws_id:
        owner_hash = hashlib.sha256(owner.encode()).hexdigest()[:16]
        return f"ccgate-pws-{owner_hash}-{ws_id}"
    if ws_type == WorkspaceType.JOB and ws_id:
        return job_volume_name(ws_id)
    return f"ccgate-ws-{sid}"


def job_volume_name(job_id: str) -> str:
    """The volume of a job's workspace (made and removed by the job, job_workspace.py)."""
    return f"ccgate-job-{job_id}"


def config_volume_name(sid: str) -> str:
    """Per-session volume for the CLI's config and transcripts (never shared)."""
    return f"ccgate-cfg-{sid}"


def session_spec(
    settings: Settings, session: Session, *, resumed_at: float | None = None
) -> SessionSpec:
    """The wrapper's SessionSpec from the session's stored config (model and permission mode
    already resolved at create), so a resumed container runs the CLI exactly as the first."""
    cfg = session.config
    return SessionSpec(
        session_id=session.id,
        model=cfg.get("model") or settings.default_model,
        system_prompt=cfg.get("system_prompt"),
        append_system_prompt=cfg.get("append_system_prompt"),
        allowed_tools=list(cfg.get("allowed_tools") or []),
        disallowed_tools=list(cfg.get("disallowed_tools") or []),
        permission_mode=cfg.get("permission_mode") or settings.default_permission_mode,
        max_turns=cfg.get("max_turns"),
        json_schema=cfg.get("json_schema"),
        timeout_seconds=cfg.get("timeout_seconds"),
        mcp_servers={
            **(cfg.get("mcp_servers") or {}),
            **sealed_servers(settings.secret_box(), cfg),
        },
        include_partial_messages=bool(cfg.get("include_partial_messages")),
        gateway_url=settings.gateway_url_for_containers(),
        interrupt_grace_s=settings.interrupt_grace_s,
        resumed_at=resumed_at,
    )


SPEC_ENV_MAX_BYTES = 64 * 1024
"""Largest spec passed in the container's environment (Linux caps one string at 128 KiB)."""


def spec_env(spec: SessionSpec) -> dict[str, str]:
    """``CCGATE_SPEC`` for a cold start: with the spec in its environment the wrapper starts the
    CLI before its own imports (``wrapper.launch``); a larger spec (long prompts) is read from
    Redis as before. The environment is the wrapper's (root); the CLI's drops it."""
    raw = spec.to_json()
    return {SPEC_ENV: raw} if len(raw.encode()) <= SPEC_ENV_MAX_BYTES else {}


class Provisioning(ServiceBase):
    """Containers, volumes and Redis access of a session, made and unmade."""

    async def _make_volumes(self, session: Session, parent: Session | None) -> None:
        """Create the session's workspace (copying the parent's for ``clone``) and config
        volumes."""
        sid, owner = session.id, session.owner
        labels = {LABEL_SESSION: sid, LABEL_OWNER: owner}
        kind = WorkspaceType(session.workspace_type)
        if kind is WorkspaceType.PERSISTENT:
            ws_labels = {LABEL_OWNER: owner, LABEL_WORKSPACE: session.workspace_id or ""}
            await self.runtime.create_volume(session.workspace_volume, ws_labels)
        elif kind not in (WorkspaceType.INHERIT, WorkspaceType.JOB):
            await self.runtime.create_volume(session.workspace_volume, labels)
            if kind is WorkspaceType.CLONE and parent is not None:
                await self.runtime.copy_volume(
                    parent.workspace_volume,
                    session.workspace_volume,
                    image=self.settings.image,
                    labels=labels,
                )
        await self.runtime.create_volume(config_volume_name(sid), labels)

    async def _provision_login(
        self, session: Session, spec: SessionSpec
    ) -> tuple[str | None, str | None]:
        """The session's spec, token, ledger group and ACL user in Redis (one round trip);
        returns the container's Redis (username, password). Raises DependencyUnavailable."""
        ttl = self.settings.session_token_ttl_s
        token = mint_token(
            key=self.jwt_key, user=session.owner, ttl_s=ttl, session_scope=session.id
        )
        return await session_redis.provision(
            self.redis,
            spec,
            acl_secret=self.jwt_key if self.settings.session_redis_acl else None,
            token=token,
            token_ttl_s=ttl,
        )

    async def _prepare(
        self, session: Session, spec: SessionSpec, parent: Session | None
    ) -> tuple[str | None, str | None]:
        """Volumes and Redis login at once (a cold start); a failure cancels the other and
        is raised as itself. Returns the login."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._make_volumes(session, parent))
                login = group.create_task(self._provision_login(session, spec))
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        return login.result()

    async def _start_container(
        self,
        db: AsyncSession,
        session: Session,
        spec: SessionSpec,
        proxy_key: str,
        *,
        name: str,
        login: tuple[str | None, str | None] | None = None,
    ) -> None:
        """Make the session's Redis login (spec, token, ACL user) unless ``login`` (from
        :meth:`_provision_login`) is given, its egress proxy if any, and start its container on
        the existing volumes; commits ``container_id``. The container's model credential is
        ``proxy_key``, valid only through the model proxy."""
        sid, owner = session.id, session.owner
        env: dict[str, str] = dict(session.config.get("env") or {})
        username, password = login or await self._provision_login(session, spec)
        assert self.network is not None and self.egress is not None
        await self.network.ensure()
        egress = session.config.get("egress") or {}
        proxy_url = None
        if egress.get("policy") == "allowlist":
            grant = await self.egress.start(
                sid, list(egress.get("domains") or []), listen=self.network.host_gateway
            )
            proxy_url = grant.url
        labels = {LABEL_SESSION: sid, LABEL_OWNER: owner}
        info = await self.start_container(
            self.container_spec(
                name=name,
                labels=labels,
                env={
                    **self.container_env(sid, env, username, password, proxy_key, proxy_url),
                    **spec_env(spec),
                },
                workspace_volume=session.workspace_volume,
                config_volume=config_volume_name(sid),
                open_egress=egress.get("policy") == "open",
            )
        )
        session.container_id = info.id
        db.add(session)
        await db.commit()

    def container_spec(
        self,
        *,
        name: str,
        labels: dict[str, str],
        env: dict[str, str],
        workspace_volume: str,
        config_volume: str,
        open_egress: bool = False,
    ) -> ContainerSpec:
        """A session container, hardened the same way whether it starts cold or in a warm
        pool: read-only root, tmpfs, the wrapper's few capabilities, limits, the runtime."""
        s = self.settings
        return ContainerSpec(
            name=name,
            image=s.image,
            env=env,
            labels=labels,
            mounts=[
                VolumeMount(workspace_volume, WORKSPACE_MOUNT),
                VolumeMount(config_volume, CONFIG_MOUNT),
            ],
            network=open_network(s) if open_egress else s.docker_network,
            memory=s.container_memory,
            cpus=s.container_cpus,
            pids=s.container_pids,
            nofile=s.container_nofile,
            extra_hosts=s.container_extra_hosts,
            cap_add=WRAPPER_CAPS,
            runtime=s.container_runtime,
            read_only=True,
            tmpfs=session_tmpfs(s.container_tmp_mib, s.container_home_mib, s.container_state_mib),
        )

    def container_env(
        self,
        sid: str,
        user_env: dict[str, str],
        username: str | None,
        password: str | None,
        proxy_key: str,
        egress_url: str | None = None,
    ) -> dict[str, str]:
        """The container's environment: no upstream credential, only the session's own (and,
        for an allowlist session, its egress proxy, bypassed for the gateway)."""
        env = dict(user_env)
        s = self.settings
        if egress_url is not None:
            no_proxy = f"{urlsplit(s.gateway_url_for_containers()).hostname},localhost,127.0.0.1"
            for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
                env[name] = egress_url
            env["NO_PROXY"] = env["no_proxy"] = no_proxy
        env.update(
            ANTHROPIC_BASE_URL=s.model_proxy_url_for_containers(),
            ANTHROPIC_API_KEY=proxy_key,
            CCGATE_SESSION_ID=sid,
            CCGATE_REDIS_URL=s.container_redis_url(username, password),
            # The wrapper's stop (interrupt 2 s + EOF wait + SIGTERM wait) fits in docker stop's.
            CCGATE_STOP_GRACE_S=f"{max(0.5, (s.stop_timeout_s - 4) / 2):g}",
            CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        )
        return env

    async def _undo_create(self, db: AsyncSession, session: Session) -> None:
        """Best-effort removal of everything a failed create made, counters included."""
        with contextlib.suppress(Exception):
            await db.rollback()
        await self._remove_resources(session, quiet=True)
        with contextlib.suppress(Exception):
            await session_redis.purge(self.redis, session.id)
        with contextlib.suppress(Exception):
            await db.exec(delete(Turn).where(col(Turn.session_id) == session.id))
            if session.parent_session_id:
                await tree.release_admission(db, session=session)
            else:
                await db.exec(delete(SpawnTree).where(col(SpawnTree.root_id) == session.id))
            await db.exec(delete(Session).where(col(Session.id) == session.id))
            await db.commit()

    async def _remove_resources(self, session: Session, *, quiet: bool) -> None:
        """Remove the container, its egress proxy and the session's own volumes (never a
        shared workspace)."""
        if self.egress is not None:
            await self.egress.stop(session.id)
        volumes = [config_volume_name(session.id)]
        if not WorkspaceType(session.workspace_type).shared:
            volumes.append(session.workspace_volume)
        containers = {session.container_id or f"ccgate-{session.id}"}
        try:  # a resumed session may have had several containers
            listed = await self.runtime.list_managed()
        except GatewayError:
            if not quiet:
                raise
            listed = []
        containers |= {c.id for c in listed if c.labels.get(LABEL_SESSION) == session.id}
        steps = [self.runtime.remove(c) for c in sorted(containers)]
        steps += [self.runtime.remove_volume(v) for v in volumes]
        for step in steps:
            try:
                await step
            except GatewayError:
                if not quiet:
                    raise
