"""The runtime interface: what ccgate needs from a container engine, and nothing more."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import IO

LABEL_MANAGED = "ccgate.managed"
LABEL_SESSION = "ccgate.session_id"
LABEL_OWNER = "ccgate.owner"
LABEL_WORKSPACE = "ccgate.workspace"
LABEL_DEPLOYMENT = "ccgate.deployment"  # the deployment that owns it (one engine, many)
# Short-lived helper containers (volume copies); the reaper skips them.
LABEL_HELPER = "ccgate.helper"
LABEL_NETNS = "ccgate.netns"  # a container in a network sandbox: the sandbox's container id
LABEL_NETWORK = "ccgate.network"  # a network sandbox: the network it holds a place on
LABEL_POOL = "ccgate.pool"  # a warm-pool container: its profile (its session label: its slot id)

FileSink = Callable[[IO[bytes], int], None]
"""Blocking consumer of an exported file: ``sink(reader, size_bytes)``, called in a worker
thread; it may raise (e.g. DependencyUnavailable("storage")), which aborts the export."""


class ContainerState(StrEnum):
    """Coarse container state."""

    RUNNING = "running"  # the main process is alive
    EXITED = "exited"  # the main process ended (see exit_code)
    OTHER = "other"  # created, restarting, paused, dead ...


@dataclass(frozen=True)
class VolumeMount:
    """A named volume mounted at ``target`` inside the container."""

    volume: str
    target: str


WRAPPER_CAPS = ("SETUID", "SETGID", "KILL", "DAC_READ_SEARCH")
"""The only capabilities a session container keeps (its wrapper's; see ContainerSpec)."""


def session_tmpfs(tmp_mib: int, home_mib: int, state_mib: int) -> dict[str, str]:
    """The writable places of a session container besides its volumes (sizes in MiB; they count
    against the container's memory): ``/tmp`` and the CLI user's home for the agent, the
    wrapper's private state (root, 0700)."""
    return {
        "/tmp": f"rw,nosuid,nodev,size={tmp_mib}m,mode=1777",
        "/home/claude": f"rw,nosuid,nodev,size={home_mib}m,uid=1000,gid=1000,mode=0755",
        "/var/lib/ccgate": f"rw,nosuid,nodev,noexec,size={state_mib}m,mode=0700",
    }


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to start one session container.

    ``memory`` uses Docker's notation ("2g"); ``cpus`` is a fraction of cores; ``pids`` caps
    processes and ``nofile`` open files (soft = hard). The container runs as ``user`` with every
    capability dropped except ``cap_add``, and no-new-privileges; ``extra_hosts`` maps names to
    addresses (``host-gateway`` allowed).

    Session containers run their wrapper as root with :data:`WRAPPER_CAPS` only: enough to start
    the CLI as uid 1000 (SETUID, SETGID), signal it (KILL) and read the files it writes
    (DAC_READ_SEARCH, for the artifact manifest). The CLI and every tool of the agent run as
    uid 1000 with no capability at all (the kernel clears them on the switch, and
    no-new-privileges keeps them from coming back).
    """

    name: str
    image: str
    env: dict[str, str]
    labels: dict[str, str]
    mounts: list[VolumeMount]
    network: str
    memory: str
    cpus: float
    pids: int
    nofile: int = 4096
    user: str = "0:0"
    cap_add: tuple[str, ...] = ()
    runtime: str | None = None
    """OCI runtime (``runsc``: gVisor); None: the engine's default."""
    read_only: bool = False
    """Read-only root filesystem; ``tmpfs`` then lists the writable places."""
    tmpfs: dict[str, str] = field(default_factory=dict)
    """tmpfs mounts: path -> mount options (``size=…,mode=…,uid=…``)."""
    extra_hosts: dict[str, str] = field(default_factory=dict)
    network_from: str | None = None
    """Join this running container's network namespace (a network sandbox, net_sandboxes.py,
    made on ``network`` with ``extra_hosts``) instead of connecting to ``network``: the
    container then starts without any network set-up of its own."""
    entrypoint: list[str] | None = None
    """Replaces the image's entrypoint (None: the image's)."""


@dataclass(frozen=True)
class ContainerInfo:
    """A container as the runtime sees it."""

    id: str
    name: str
    state: ContainerState
    labels: dict[str, str]
    exit_code: int | None = None
    oom_killed: bool = False
    """The kernel's OOM killer ended it (Docker's ``State.OOMKilled``)."""


@dataclass(frozen=True)
class ContainerDeath:
    """One ``die`` (the container ended) or ``oom`` (a process in it hit the memory limit and
    was killed; the container may live on) event of a container of this deployment."""

    action: str
    container_id: str
    labels: dict[str, str]
    exit_code: int | None
    at: float
    """Unix time of the event (seconds)."""


class ContainerRuntime(abc.ABC):
    """Async container engine operations. Errors: DependencyUnavailable("docker", ...) when the
    engine is unreachable, ContainerStartFailed when a container cannot be created or started."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise DependencyUnavailable unless the engine answers."""

    @abc.abstractmethod
    async def ensure_network(self, name: str, *, internal: bool, bridge: str) -> list[str]:
        """Create the sessions network if it does not exist: inter-container traffic off,
        ``internal`` (no route out through Docker's NAT), its Linux bridge named ``bridge``.
        A network of that name made differently is re-created when no container uses it
        (else it is kept and a warning logged). Returns the host's addresses on the sessions
        network and on Docker's default bridge (where ``host-gateway`` points)."""

    @abc.abstractmethod
    async def create_volume(
        self, name: str, labels: dict[str, str], driver_opts: dict[str, str] | None = None
    ) -> None:
        """Create a named volume (no-op when it exists). ``driver_opts`` are the local
        driver's mount options (``type``, ``device``, ``o``: a bind or overlay mount of host
        directories, mounted when a container first uses the volume)."""

    @abc.abstractmethod
    async def check_volume(self, name: str, *, image: str) -> None:
        """Mount volume ``name`` in a throwaway container of ``image`` and list it; raises
        ContainerStartFailed (with the engine's message) when the mount fails."""

    @abc.abstractmethod
    async def remove_volume(self, name: str) -> None:
        """Remove a named volume; missing is fine."""

    @abc.abstractmethod
    async def start(self, spec: ContainerSpec) -> ContainerInfo:
        """Create and start a container."""

    @abc.abstractmethod
    async def stop(self, container_id: str, *, timeout_s: int) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; missing is fine."""

    @abc.abstractmethod
    async def remove(self, container_id: str) -> None:
        """Force-remove the container (and its anonymous volumes); missing is fine."""

    @abc.abstractmethod
    async def kill(self, container_id: str) -> None:
        """SIGKILL the container now (no grace); missing or already dead is fine."""

    @abc.abstractmethod
    def deaths(self) -> AsyncIterator[ContainerDeath | None]:
        """Follow the engine's event stream: each container of this deployment that dies or
        hits its memory limit, as it happens. ``None`` means events were dropped (the consumer
        fell behind): reconcile by listing. Raises DependencyUnavailable when the stream
        cannot be opened or ends."""

    @abc.abstractmethod
    async def inspect(self, container_id: str) -> ContainerInfo | None:
        """Current state, or None when the container does not exist."""

    @abc.abstractmethod
    async def list_managed(self) -> list[ContainerInfo]:
        """Every container of this deployment (labels ``ccgate.managed`` and
        ``ccgate.deployment``); other deployments on the same engine are never listed."""

    @abc.abstractmethod
    async def copy_volume(
        self, source: str, target: str, *, image: str, labels: dict[str, str]
    ) -> None:
        """Copy every file of volume ``source`` into volume ``target`` (ownership kept)."""

    @abc.abstractmethod
    async def list_managed_volumes(self) -> dict[str, dict[str, str]]:
        """Names and labels of this deployment's volumes carrying a ``ccgate.session_id``."""

    @abc.abstractmethod
    async def export_file(
        self, container_id: str, path: str, *, max_bytes: int, sink: FileSink
    ) -> tuple[int, str]:
        """Stream a regular file out of the container into ``sink``; returns (size, sha256).
        Raises FileNotFoundError, or ValueError when it is larger than ``max_bytes``."""
