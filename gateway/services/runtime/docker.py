"""DockerRuntime: the runtime interface over the docker SDK; every SDK call runs on the runtime's
own thread pool (``CCGATE_DOCKER_THREADS``), never on the loop or asyncio's shared executor."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import tarfile
from collections.abc import AsyncIterator, Callable
from typing import IO, Any, TypeVar, cast

import docker
from docker.errors import APIError, ContainerError, DockerException, ImageNotFound, NotFound
from docker.models.networks import Network
from docker.types import LogConfig, Ulimit
from requests.exceptions import RequestException

from gateway.errors import ContainerStartFailed, DependencyUnavailable
from gateway.executors import BlockingPool
from gateway.services.runtime.archive import ChunkReader, HashingReader
from gateway.services.runtime.base import (
    LABEL_DEPLOYMENT,
    LABEL_HELPER,
    LABEL_MANAGED,
    LABEL_NETNS,
    LABEL_SESSION,
    ContainerDeath,
    ContainerInfo,
    ContainerRuntime,
    ContainerSpec,
    ContainerState,
    FileSink,
)
from gateway.services.runtime.docker_events import follow_deaths

logger = logging.getLogger(__name__)

T = TypeVar("T")

_UNREACHABLE = (RequestException, ConnectionError, OSError)


def _info(container: Any) -> ContainerInfo:
    status = container.attrs.get("State", {})
    raw = status.get("Status", container.status)
    state = {"running": ContainerState.RUNNING, "exited": ContainerState.EXITED}.get(
        raw, ContainerState.OTHER
    )
    return ContainerInfo(
        id=container.id,
        name=container.name,
        state=state,
        labels=dict(container.labels or {}),
        exit_code=status.get("ExitCode") if state is ContainerState.EXITED else None,
        oom_killed=bool(status.get("OOMKilled")),
    )


def bridge_gateway(ipam_config: dict[str, Any]) -> str | None:
    """The host's IPv4 address on a bridge network from one IPAM config entry: its
    ``Gateway``, or — when the engine does not list it (Docker 28 leaves it out for the
    default bridge) — the first address of its ``Subnet``, which is where Docker puts it.
    None for IPv6 or an entry without either."""
    gateway = ipam_config.get("Gateway")
    if isinstance(gateway, str) and gateway and ":" not in gateway:
        return gateway
    subnet = ipam_config.get("Subnet")
    if isinstance(subnet, str) and subnet and ":" not in subnet:
        try:
            return str(next(ipaddress.ip_network(subnet, strict=False).hosts()))
        except (ValueError, StopIteration):
            return None
    return None


class DockerRuntime(ContainerRuntime):
    """Containers on a Docker engine found through DOCKER_HOST or the default socket.

    Everything it creates carries ``ccgate.deployment=<deployment>``, and it lists only those:
    several deployments (or test gateways) can share one engine without touching each other.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        deployment: str = "default",
        pool: BlockingPool | None = None,
    ) -> None:
        self.pool = pool or BlockingPool("docker", 16)
        self._base_url = base_url
        self._deployment = deployment
        self._own = {LABEL_MANAGED: "true", LABEL_DEPLOYMENT: deployment}
        self._client: docker.DockerClient | None = None

    def _docker(self) -> docker.DockerClient:
        if self._client is None:
            if self._base_url:
                self._client = docker.DockerClient(base_url=self._base_url, timeout=60)
            else:
                self._client = docker.from_env(timeout=60)
        return self._client

    async def _call(self, fn: Callable[[], T]) -> T:
        try:
            return await self.pool.run(fn)
        except (APIError, NotFound, ContainerError):
            raise
        except (DockerException, *_UNREACHABLE) as exc:
            raise DependencyUnavailable("docker", str(exc)) from exc

    async def close(self) -> None:
        """Close the SDK's HTTP connection pool."""
        if self._client is not None:
            await self.pool.run(self._client.close)
        self.pool.shutdown()

    async def ping(self) -> None:
        """Raise DependencyUnavailable unless the engine answers."""
        try:
            await self._call(lambda: self._docker().ping())
        except APIError as exc:
            raise DependencyUnavailable("docker", str(exc)) from exc

    async def ensure_network(self, name: str, *, internal: bool, bridge: str) -> list[str]:
        """See ContainerRuntime.ensure_network."""
        options = {
            "com.docker.network.bridge.enable_icc": "false",
            "com.docker.network.bridge.name": bridge,
        }

        def _matches(network: Network) -> bool:
            attrs = network.attrs
            opts = attrs.get("Options") or {}
            return bool(attrs.get("Internal")) == internal and all(
                opts.get(k) == v for k, v in options.items()
            )

        def _ensure() -> list[str]:
            client = self._docker()
            found = [n for n in client.networks.list(names=[name]) if n.name == name]
            if found:
                network = client.networks.get(found[0].id)
                if not _matches(network):
                    if network.attrs.get("Containers"):
                        logger.warning(
                            "network %s is not set up as configured (internal=%s, bridge %s) "
                            "and has containers; keeping it until they are gone",
                            name,
                            internal,
                            bridge,
                        )
                    else:
                        logger.warning("re-creating network %s as configured", name)
                        network.remove()
                        found = []
            if not found:
                try:
                    client.networks.create(
                        name,
                        driver="bridge",
                        internal=internal,
                        labels={LABEL_MANAGED: "true"},
                        options=options,
                    )
                except APIError as exc:
                    if exc.status_code != 409:
                        raise
            addresses = []
            for net in (name, "bridge"):
                for config in client.networks.get(net).attrs.get("IPAM", {}).get("Config") or []:
                    gateway = bridge_gateway(config)
                    if gateway:
                        addresses.append(gateway)
            return addresses

        try:
            return await self._call(_ensure)
        except APIError as exc:
            raise DependencyUnavailable("docker", f"network {name}: {exc}") from exc

    async def create_volume(
        self, name: str, labels: dict[str, str], driver_opts: dict[str, str] | None = None
    ) -> None:
        """Create a named volume (no-op when it exists)."""
        try:
            await self._call(
                lambda: self._docker().volumes.create(
                    name=name,
                    driver="local",
                    driver_opts=driver_opts or None,
                    labels={**labels, **self._own},
                )
            )
        except APIError as exc:
            raise ContainerStartFailed(f"volume {name}: {exc.explanation or exc}") from exc

    async def check_volume(self, name: str, *, image: str) -> None:
        """Mount ``name`` read-only in a throwaway container (no network, no capabilities)
        that lists it; the engine mounts a local-driver volume's device on first use, so a
        mount it cannot make fails here."""

        def _check() -> None:
            self._docker().containers.run(
                image,
                entrypoint=["ls", "-a", "/probe"],
                volumes={name: {"bind": "/probe", "mode": "ro"}},
                user="1000:1000",
                network_disabled=True,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges:true"],
                labels={**self._own, LABEL_HELPER: "probe"},
                remove=True,
            )

        try:
            await self._call(_check)
        except (APIError, ContainerError) as exc:
            raise ContainerStartFailed(f"volume {name}: {exc}") from exc

    async def remove_volume(self, name: str) -> None:
        """Remove a named volume; missing is fine. Retries while a just-removed container
        still holds it."""

        def _remove() -> None:
            try:
                self._docker().volumes.get(name).remove(force=True)
            except NotFound:
                return

        for attempt in range(20):
            try:
                await self._call(_remove)
                return
            except APIError as exc:
                if exc.status_code != 409 or attempt == 19:
                    raise DependencyUnavailable("docker", f"volume {name}: {exc}") from exc
                await asyncio.sleep(0.1)

    async def start(self, spec: ContainerSpec) -> ContainerInfo:
        """Create and start the session container with the hardening of the spec."""

        def _run() -> ContainerInfo:
            # The low-level API: the models' create() and start() inspect the container after
            # each call, two round trips on the path to a running container that nothing reads.
            api = self._docker().api
            labels = {**spec.labels, **self._own}
            joined = spec.network_from is not None
            if joined:
                labels[LABEL_NETNS] = str(spec.network_from)
            host_config = api.create_host_config(
                binds=[f"{m.volume}:{m.target}:rw" for m in spec.mounts],
                network_mode=f"container:{spec.network_from}" if joined else spec.network,
                cap_drop=["ALL"],
                cap_add=list(spec.cap_add),
                read_only=spec.read_only,
                runtime=spec.runtime,
                tmpfs=spec.tmpfs,
                security_opt=["no-new-privileges:true"],
                mem_limit=spec.memory,
                memswap_limit=spec.memory,
                nano_cpus=int(spec.cpus * 1e9),
                pids_limit=spec.pids,
                ulimits=[Ulimit(name="nofile", soft=spec.nofile, hard=spec.nofile)],
                # A joined namespace brings its /etc/hosts; Docker refuses both.
                extra_hosts=None if joined else spec.extra_hosts,
                log_config=LogConfig(
                    type=LogConfig.types.JSON, config={"max-size": "10m", "max-file": "3"}
                ),
            )
            created = api.create_container(
                spec.image,
                name=spec.name,
                environment=spec.env,
                labels=labels,
                user=spec.user,
                volumes=[m.target for m in spec.mounts],
                host_config=host_config,
                entrypoint=spec.entrypoint,
                networking_config=None
                if joined
                else api.create_networking_config({spec.network: api.create_endpoint_config()}),
                stop_signal="SIGTERM",
            )
            container_id = str(created["Id"])
            try:
                api.start(container_id)
            except BaseException:
                api.remove_container(container_id, force=True)
                raise
            return ContainerInfo(
                id=container_id, name=spec.name, state=ContainerState.RUNNING, labels=labels
            )

        try:
            return await self._call(_run)
        except ImageNotFound as exc:
            raise ContainerStartFailed(
                f"image {spec.image} not found; build it with scripts/build-image.sh"
            ) from exc
        except APIError as exc:
            raise ContainerStartFailed(str(exc.explanation or exc)) from exc

    async def stop(self, container_id: str, *, timeout_s: int) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; missing is fine."""

        def _stop() -> None:
            try:
                self._docker().containers.get(container_id).stop(timeout=timeout_s)
            except NotFound:
                return

        try:
            await self._call(_stop)
        except APIError as exc:
            raise DependencyUnavailable("docker", str(exc)) from exc

    async def remove(self, container_id: str) -> None:
        """Force-remove, and the network sandbox it joined if any; missing is fine."""

        def _remove() -> None:
            try:
                container = self._docker().containers.get(container_id)
                container.remove(force=True, v=True)
            except NotFound:
                return
            sandbox = (container.labels or {}).get(LABEL_NETNS)
            if sandbox:
                try:
                    self._docker().api.remove_container(sandbox, force=True)
                except NotFound:
                    return

        try:
            await self._call(_remove)
        except APIError as exc:
            if exc.status_code == 409:  # removal already in progress
                return
            raise DependencyUnavailable("docker", str(exc)) from exc

    async def kill(self, container_id: str) -> None:
        """SIGKILL now; missing or not running is fine."""

        def _kill() -> None:
            try:
                self._docker().containers.get(container_id).kill()
            except NotFound:
                return
            except APIError as exc:
                if exc.status_code != 409:  # 409: not running
                    raise

        try:
            await self._call(_kill)
        except APIError as exc:
            raise DependencyUnavailable("docker", str(exc)) from exc

    def deaths(self) -> AsyncIterator[ContainerDeath | None]:
        """Container deaths of this deployment, as the engine reports them
        (runtime/docker_events.py)."""
        return follow_deaths(
            self._docker, [LABEL_MANAGED, f"{LABEL_DEPLOYMENT}={self._deployment}"]
        )

    async def inspect(self, container_id: str) -> ContainerInfo | None:
        """Current state, or None when the container does not exist."""

        def _get() -> ContainerInfo | None:
            try:
                return _info(self._docker().containers.get(container_id))
            except NotFound:
                return None

        return await self._call(_get)

    async def list_managed(self) -> list[ContainerInfo]:
        """Every ccgate container, running or not."""
        containers = await self._call(
            lambda: self._docker().containers.list(
                all=True,
                filters={"label": [LABEL_MANAGED, f"{LABEL_DEPLOYMENT}={self._deployment}"]},
                # A container removed between the listing and its inspection is not an error.
                ignore_removed=True,
            )
        )
        return [_info(c) for c in containers]

    async def copy_volume(
        self, source: str, target: str, *, image: str, labels: dict[str, str]
    ) -> None:
        """Run a throwaway container of ``image`` (no network, no capabilities but the ones
        ``cp -a`` needs as the session user) that copies ``source`` into ``target``."""

        def _copy() -> None:
            self._docker().containers.run(
                image,
                # Mounted first at /workspace, the new volume takes that directory's owner
                # (the session user) from the image.
                entrypoint=["cp", "-a", "/from/.", "/workspace/"],
                volumes={
                    source: {"bind": "/from", "mode": "ro"},
                    target: {"bind": "/workspace", "mode": "rw"},
                },
                user="1000:1000",
                network_disabled=True,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges:true"],
                labels={**labels, **self._own, LABEL_HELPER: "copy"},
                remove=True,
            )

        try:
            await self._call(_copy)
        except (APIError, ContainerError) as exc:
            raise ContainerStartFailed(f"copying workspace {source}: {exc}") from exc

    async def list_managed_volumes(self) -> dict[str, dict[str, str]]:
        """Names and labels of every volume carrying a ``ccgate.session_id`` label."""
        volumes = await self._call(
            lambda: self._docker().volumes.list(
                filters={"label": [LABEL_SESSION, f"{LABEL_DEPLOYMENT}={self._deployment}"]}
            )
        )
        return {v.name: dict(v.attrs.get("Labels") or {}) for v in volumes}

    async def export_file(
        self, container_id: str, path: str, *, max_bytes: int, sink: FileSink
    ) -> tuple[int, str]:
        """Stream one regular file out through the archive API into ``sink`` (works on stopped
        containers too); nothing is held whole in memory. Returns (size, sha256 hex)."""

        def _export() -> tuple[int, str]:
            try:
                chunks, stat = (
                    self._docker()
                    .containers.get(container_id)
                    .get_archive(path, chunk_size=256 * 1024)
                )
            except NotFound as exc:
                raise FileNotFoundError(path) from exc
            if stat.get("size", 0) > max_bytes:
                raise ValueError(f"{path} is {stat['size']} bytes (limit {max_bytes})")
            with tarfile.open(fileobj=cast(IO[bytes], ChunkReader(chunks)), mode="r|") as tar:
                member = tar.next()
                if member is None or not member.isfile():
                    raise FileNotFoundError(f"{path} is not a regular file")
                if member.size > max_bytes:
                    raise ValueError(f"{path} is {member.size} bytes (limit {max_bytes})")
                extracted = tar.extractfile(member)
                assert extracted is not None
                reader = HashingReader(extracted)
                sink(cast(IO[bytes], reader), member.size)
                reader.drain()
                return reader.count, reader.sha256.hexdigest()

        return await self._call(_export)
