"""The test suite's shared servers as containers, started and removed through testcontainers.

Redis, PostgreSQL and the S3 stand-in (moto) run from images built locally by
``scripts/build-image.sh --test-services`` (container/services/*.Dockerfile) on the same
registry-free Debian base as the session image: nothing is pulled. testcontainers' reaper
(Ryuk) is an image from a registry too, so it is disabled; these fixtures remove their
containers themselves, and :func:`remove_leftovers` removes those of a run that was killed
(every container carries the label ``ccgate.test-service`` and its run's host and pid).

Each server publishes its port on all host addresses, so session containers reach it through
``host.docker.internal`` like a server on the host. Tests that restart a server on the same
port (tests/servers.py ``RedisServer``) keep using processes.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass

import docker
from testcontainers.core.config import testcontainers_config
from testcontainers.core.container import DockerContainer

testcontainers_config.ryuk_disabled = True

LABEL = "ccgate.test-service"
IMAGES = {
    "redis": "ccgate-test-redis:latest",
    "postgres": "ccgate-test-postgres:latest",
    "s3": "ccgate-test-s3:latest",
}


RUN = f"{socket.gethostname()}:{os.getpid()}"
"""This run's mark on its containers (host and pid of the pytest process)."""


def _run_is_alive(run: str) -> bool:
    host, _, pid = run.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's run: not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(*, own: bool = False) -> int:
    """Remove service containers of runs that died (their pytest process is gone), or with
    ``own`` this run's; a run going on beside this one keeps its servers. Returns how many."""
    client = docker.from_env()
    removed = 0
    try:
        for container in client.containers.list(all=True, filters={"label": LABEL}):
            run = container.labels.get(f"{LABEL}.run", "")
            if (own and run == RUN) or (not own and run != RUN and not _run_is_alive(run)):
                container.remove(force=True)
                removed += 1
        return removed
    finally:
        client.close()


def require_images() -> None:
    """Fail loudly, saying how to build them, when a service image is missing."""
    client = docker.from_env()
    try:
        for image in IMAGES.values():
            try:
                client.images.get(image)
            except docker.errors.ImageNotFound as exc:
                raise RuntimeError(
                    f"{image} is missing: run scripts/build-image.sh --test-services "
                    "(scripts/setup.sh does)"
                ) from exc
    finally:
        client.close()


def _wait(check: object, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up in {timeout_s:g}s: {last}")


@dataclass
class _Service:
    container: DockerContainer | None = None
    port: int = 0

    def _run(self, kind: str, internal_port: int, command: list[str] | None = None) -> None:
        container = DockerContainer(IMAGES[kind]).with_exposed_ports(internal_port)
        container = container.with_kwargs(labels={LABEL: kind, f"{LABEL}.run": RUN})
        if command is not None:
            container = container.with_command(command)
        self.container = container.start()
        self.port = int(self.container.get_exposed_port(internal_port))

    def stop(self) -> None:
        """Stop and remove the container."""
        if self.container is not None:
            self.container.stop()
            self.container = None


@dataclass
class RedisContainer(_Service):
    """Redis with a password, like tests/servers.py RedisServer (``url``, ``port``)."""

    password: str = "ccgate-test"

    @property
    def url(self) -> str:
        """URL for the gateway (loopback, the published port)."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> RedisContainer:
        """Start and wait for an authenticated PING."""
        self._run(
            "redis",
            6379,
            ["--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no",
             "--requirepass", self.password],
        )  # fmt: skip

        def pong() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                reply = b""
                while b"PONG" not in reply:
                    chunk = s.recv(64)
                    if not chunk:
                        return False
                    reply += chunk
                return True

        _wait(pong, "redis container")
        return self


@dataclass
class PostgresContainer(_Service):
    """PostgreSQL 15 (trust auth), like tests/servers.py PostgresServer (``url``)."""

    @property
    def url(self) -> str:
        """asyncpg URL."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> PostgresContainer:
        """Start and wait until it accepts queries."""
        self._run("postgres", 5432)
        assert self.container is not None
        container = self.container

        def accepting() -> bool:
            code, _ = container.exec(
                ["psql", "-h", "127.0.0.1", "-U", "postgres", "-c", "SELECT 1"]
            )
            return code == 0

        _wait(accepting, "postgres container")
        return self

    def new_database(self) -> str:
        """Create an empty database of its own for one test; returns its asyncpg URL."""
        assert self.container is not None
        name = f"t_{uuid.uuid4().hex[:12]}"
        code, output = self.container.exec(
            ["psql", "-h", "127.0.0.1", "-U", "postgres", "-c", f"CREATE DATABASE {name}"]
        )
        assert code == 0, output
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}"


@dataclass
class S3Container(_Service):
    """moto's S3 server, like tests/servers.py S3Server (``endpoint`` and keys)."""

    access_key: str = "test-access"
    secret_key: str = "test-secret"

    @property
    def endpoint(self) -> str:
        """host:port for the minio SDK."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> S3Container:
        """Start and wait for an HTTP answer."""
        self._run("s3", 5000)

        def answers() -> bool:
            try:
                with urllib.request.urlopen(f"http://{self.endpoint}/", timeout=1):
                    return True
            except urllib.error.HTTPError:
                return True

        _wait(answers, "s3 container")
        return self
