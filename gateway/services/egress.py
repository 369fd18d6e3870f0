"""Per-session egress through a real forward proxy: one tinyproxy per ``allowlist`` session.

A session whose config asks for ``egress: {"policy": "allowlist", "domains": [...]}`` gets its
own tinyproxy (Debian's package, installed by scripts/setup.sh) on the gateway's host, started
before its container: domain filter with default deny (``FilterType ere``, one anchored rule
per domain, ``*.example.com`` also matching subdomains), CONNECT limited to
``CCGATE_EGRESS_CONNECT_PORTS`` (443 and 80), Basic auth with a random password of the session.
The container gets ``HTTPS_PROXY``/``HTTP_PROXY`` (and lower-case) pointing at it, with
``NO_PROXY`` for the gateway. The proxy listens on the host in ``CCGATE_EGRESS_PORTS``
(30000-30999), the one range besides the gateway and Redis that the sessions firewall lets
containers reach; every other destination stays refused, so the proxy is the only way out and
it only goes where the list says.

The proxy is the replica's child process: started (≤ 5 s to listen, else 503 ``egress proxy``
and the create is undone), restarted if it dies (at most 3 times a minute, then left down and
logged: the session loses egress, nothing else), stopped when the session stops or is deleted,
and swept every 30 s for sessions no longer live (a crashed stop, another replica's delete).
A replica that dies takes its proxies with it; the sessions keep running without egress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.config import Settings
from gateway.db.models import Session, SessionStatus
from gateway.errors import DependencyUnavailable

logger = logging.getLogger(__name__)

LIVE = [SessionStatus.STARTING, SessionStatus.IDLE, SessionStatus.RUNNING]


def domain_rule(domain: str) -> str:
    """The anchored ERE tinyproxy matches a host name against (``*.x`` = x and subdomains)."""
    if domain.startswith("*."):
        return r"^(.+\.)?" + re.escape(domain[2:]) + "$"
    return "^" + re.escape(domain) + "$"


def proxy_config(
    *, port: int, listen: str, password: str, filter_path: Path, connect_ports: list[int]
) -> str:
    """tinyproxy.conf of one session (tinyproxy 1.11 syntax)."""
    lines = [
        f"Port {port}",
        f"Listen {listen}",
        "Timeout 600",
        "MaxClients 100",
        "LogLevel Warning",
        "DisableViaHeader Yes",
        f"BasicAuth ccgate {password}",
        f'Filter "{filter_path}"',
        "FilterType ere",
        "FilterDefaultDeny Yes",
        "FilterURLs Off",
        *(f"ConnectPort {p}" for p in connect_ports),
    ]
    return "\n".join(lines) + "\n"


@dataclass
class EgressGrant:
    """What a container is told: the proxy URL (with its credentials)."""

    url: str


@dataclass
class _Proxy:
    session_id: str
    port: int
    directory: Path
    config: Path
    process: asyncio.subprocess.Process | None = None
    watcher: asyncio.Task[None] | None = None
    restarts: list[float] = field(default_factory=list)
    stopping: bool = False


class EgressProxies:
    """The tinyproxy processes of this replica's allowlist sessions."""

    def __init__(self, settings: Settings, db_factory: async_sessionmaker[AsyncSession]) -> None:
        self._settings = settings
        self._db = db_factory
        self._proxies: dict[str, _Proxy] = {}
        self._lock = asyncio.Lock()
        self._binary = shutil.which(settings.egress_proxy_bin)

    @property
    def count(self) -> int:
        """Proxies running on this replica."""
        return len(self._proxies)

    async def start(self, session_id: str, domains: list[str], *, listen: str) -> EgressGrant:
        """Start the session's proxy; raises DependencyUnavailable("egress proxy")."""
        if self._binary is None:
            raise DependencyUnavailable(
                "egress proxy", f"{self._settings.egress_proxy_bin} is not installed"
            )
        password = secrets.token_urlsafe(24)
        directory = self._settings.data_dir / "egress" / session_id
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        filter_path = directory / "filter"
        filter_path.write_text("".join(domain_rule(d) + "\n" for d in domains))
        async with self._lock:
            port = self._free_port(listen)
            config = directory / "tinyproxy.conf"
            config.write_text(
                proxy_config(
                    port=port,
                    listen=listen,
                    password=password,
                    filter_path=filter_path,
                    connect_ports=self._settings.egress_connect_ports,
                )
            )
            config.chmod(0o600)
            proxy = _Proxy(session_id, port, directory, config)
            self._proxies[session_id] = proxy
        try:
            await self._launch(proxy)
            await self._until_listening(listen, port)
        except BaseException:
            await self.stop(session_id)
            raise
        proxy.watcher = asyncio.get_running_loop().create_task(self._watch(proxy))
        return EgressGrant(url=f"http://ccgate:{password}@{self._settings.egress_host}:{port}")

    async def stop(self, session_id: str) -> None:
        """Stop the session's proxy (no-op when it has none) and remove its files."""
        proxy = self._proxies.pop(session_id, None)
        if proxy is None:
            return
        proxy.stopping = True
        if proxy.watcher is not None:
            proxy.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await proxy.watcher
        await self._terminate(proxy)
        shutil.rmtree(proxy.directory, ignore_errors=True)

    async def sweep(self) -> None:
        """Stop the proxies of sessions that are no longer live (every 30 s, supervised)."""
        while True:
            await asyncio.sleep(30)
            ids = list(self._proxies)
            if not ids:
                continue
            async with self._db() as db:
                rows = await db.exec(
                    select(Session.id)
                    .where(col(Session.id).in_(ids))
                    .where(col(Session.status).in_(LIVE))
                )
                live = set(rows.all())
            for sid in ids:
                if sid not in live:
                    logger.info("egress: stopping the proxy of ended session %s", sid)
                    await self.stop(sid)

    async def close(self) -> None:
        """Stop every proxy (gateway shutdown)."""
        for sid in list(self._proxies):
            await self.stop(sid)

    def _free_port(self, listen: str) -> int:
        low, high = self._settings.egress_port_range
        used = {p.port for p in self._proxies.values()}
        for port in range(low, high + 1):
            if port in used:
                continue
            with socket.socket() as probe:
                try:
                    probe.bind((listen, port))
                except OSError:
                    continue
            return port
        raise DependencyUnavailable("egress proxy", f"no free port in {low}-{high}")

    async def _launch(self, proxy: _Proxy) -> None:
        assert self._binary is not None
        proxy.process = await asyncio.create_subprocess_exec(
            self._binary,
            "-d",
            "-c",
            str(proxy.config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    async def _until_listening(self, host: str, port: int) -> None:
        deadline = time.monotonic() + 5
        while True:
            try:
                _, writer = await asyncio.open_connection(host, port)
                writer.close()
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise DependencyUnavailable(
                        "egress proxy", f"tinyproxy did not listen on {host}:{port}: {exc}"
                    ) from exc
                await asyncio.sleep(0.05)

    async def _watch(self, proxy: _Proxy) -> None:
        """Restart the proxy if it dies (≤ 3 times a minute)."""
        while not proxy.stopping and proxy.process is not None:
            code = await proxy.process.wait()
            if proxy.stopping:
                return
            now = time.monotonic()
            proxy.restarts = [t for t in proxy.restarts if now - t < 60] + [now]
            if len(proxy.restarts) > 3:
                logger.error(
                    "egress: the proxy of %s keeps dying (exit %s); left down",
                    proxy.session_id,
                    code,
                )
                return
            logger.warning(
                "egress: the proxy of %s exited (%s); restarting", proxy.session_id, code
            )
            await asyncio.sleep(0.5)
            await self._launch(proxy)

    async def _terminate(self, proxy: _Proxy) -> None:
        process = proxy.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()
