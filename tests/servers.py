"""Servers as processes for the tests that need to control them: Redis restarted on the same
port (with or without its append-only file), a PostgreSQL of a test's own, the gateway itself
(in a thread, or as ``ccgate serve`` processes that can be SIGKILLed), and the benchmarks.

The suite's shared Redis, PostgreSQL and S3 server run as containers through testcontainers
(tests/containers.py). Redis here binds 0.0.0.0 with a password so session containers can reach
it through host.docker.internal.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from gateway.config import Settings


def free_port() -> int:
    """An unused TCP port on this machine."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    """Poll ``check`` every 50 ms until it is true; raise RuntimeError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up in {timeout_s:g}s")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def require_binary(name: str, *extra_dirs: str) -> str:
    """Absolute path of a program, or a loud failure saying how to install it."""
    path = shutil.which(name)
    for directory in extra_dirs:
        candidate = Path(directory) / name
        if path is None and candidate.exists():
            path = str(candidate)
    if path is None:
        raise RuntimeError(f"{name} is not installed: run scripts/setup.sh (or bash .ci/run)")
    return path


@dataclass
class RedisServer:
    """A redis-server process with a password, restartable on the same port."""

    port: int = field(default_factory=free_port)
    password: str = "ccgate-test"
    proc: subprocess.Popen[bytes] | None = None
    data_dir: str | None = None
    """With a directory, Redis keeps an append-only file there and survives restarts."""

    @property
    def url(self) -> str:
        """URL for the gateway (loopback)."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start and wait for PING."""
        binary = require_binary("redis-server")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port", str(self.port),
                "--bind", "0.0.0.0",
                "--requirepass", self.password,
                "--save", "",
                "--appendonly", "yes" if self.data_dir else "no",
                "--dir", self.data_dir or tempfile.gettempdir(),
                "--protected-mode", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(lambda: _port_open(self.port), timeout_s=10, what="redis-server")
        return self

    def stop(self) -> None:
        """Stop the process (data is lost: no persistence)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@dataclass
class PostgresServer:
    """A throwaway PostgreSQL cluster (initdb in a temp dir), run as a non-root user."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    datadir: str = ""
    _argv: list[str] = field(default_factory=list)
    _user: str | None = None

    @property
    def url(self) -> str:
        """asyncpg URL (trust auth on loopback)."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> PostgresServer:
        """initdb, start, wait for the port."""
        pg_dirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
        extra = [str(d) for d in pg_dirs]
        initdb = require_binary("initdb", *extra)
        postgres = require_binary("postgres", *extra)
        user = None
        if os.geteuid() == 0:
            user = "ccgate-pg"
            try:
                pwd.getpwnam(user)
            except KeyError:
                subprocess.run(["useradd", "--system", "--no-create-home", user], check=True)
        root = tempfile.mkdtemp(prefix="ccgate-pg-")
        self.datadir = os.path.join(root, "data")
        if user is not None:
            shutil.chown(root, user)
        subprocess.run(
            [initdb, "-D", self.datadir, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            check=True,
            stdout=subprocess.DEVNULL,
            user=user,
        )
        self._argv = [
            postgres, "-D", self.datadir, "-p", str(self.port), "-k", root,
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200",
        ]  # fmt: skip
        self._user = user
        self._run()
        return self

    def _run(self) -> None:
        self.proc = subprocess.Popen(
            self._argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, user=self._user
        )
        wait_until(lambda: _port_open(self.port), timeout_s=30, what="postgres")
        time.sleep(0.3)

    def halt(self) -> None:
        """Stop the server (clients are disconnected) and keep its cluster: a database outage
        that :meth:`resume` ends, on the same port with the same data."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=30)
            self.proc = None

    def resume(self) -> None:
        """Start the halted server again."""
        self._run()

    def stop(self) -> None:
        """Stop (fast shutdown: clients are disconnected) and delete the cluster."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=30)
            self.proc = None
        shutil.rmtree(os.path.dirname(self.datadir), ignore_errors=True)


@dataclass
class S3Server:
    """moto's S3-compatible server (the stand-in for MinIO on these machines)."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    access_key: str = "test-access"
    secret_key: str = "test-secret"

    @property
    def endpoint(self) -> str:
        """host:port for the minio SDK."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        """Start moto_server and wait for the port."""
        binary = require_binary("moto_server", str(Path(os.sys.executable).parent))
        self.proc = subprocess.Popen(
            [binary, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: _port_open(self.port), timeout_s=30, what="moto_server")
        return self

    def stop(self) -> None:
        """Stop the server."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


def remove_network_sandboxes(deployment: str) -> None:
    """Remove the network sandboxes of ``deployment`` (the ready ones a stopped test gateway
    leaves behind: a deployment keeps them across restarts, a test's ends with it)."""
    listed = subprocess.run(
        ["docker", "ps", "-aq", "--filter", "label=ccgate.helper=netns",
         "--filter", f"label=ccgate.deployment={deployment}"],
        capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    if listed:
        subprocess.run(["docker", "rm", "-f", *listed], capture_output=True, check=False)


class _GatewayAddress:
    """HTTP and WebSocket base URLs of a gateway listening on ``port``."""

    port: int

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """ws://127.0.0.1:PORT"""
        return f"ws://127.0.0.1:{self.port}"


class GatewayServer(_GatewayAddress):
    """The real gateway app under uvicorn in a background thread."""

    def __init__(self, settings: Settings, port: int | None = None) -> None:
        """``port``: listen there (a restarted gateway takes its predecessor's port, which
        running containers use for the model proxy and the MCP tools)."""
        from gateway.main import create_app

        self.port = port or free_port()
        # Containers call the gateway (ccgate MCP tools) through the host gateway address.
        if settings.container_gateway_url is None:
            settings.container_gateway_url = f"http://host.docker.internal:{self.port}"
        self.settings = settings
        self.app = create_app(settings)
        config = uvicorn.Config(
            self.app, host="0.0.0.0", port=self.port, log_level="warning", ws_max_size=1 << 26
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="gateway", daemon=True)

    def start(self) -> GatewayServer:
        """Start and wait until it serves."""
        self._thread.start()
        wait_until(lambda: self._server.started, timeout_s=60, what="gateway")
        return self

    def stop(self) -> None:
        """Graceful shutdown (runs the lifespan's close), then remove the deployment's ready
        network sandboxes (a deployment keeps them across restarts; a test's ends here)."""
        self._server.should_exit = True
        self._thread.join(timeout=30)
        remove_network_sandboxes(self.settings.deployment_id)


class GatewayProcess(_GatewayAddress):
    """``ccgate serve`` as a separate process (a replica that can be SIGKILLed), configured
    through the environment like a deployment."""

    def __init__(self, settings: dict[str, object], port: int | None = None) -> None:
        self.port = port or free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CCGATE_")}
        env.update({f"CCGATE_{k.upper()}": str(v) for k, v in settings.items()})
        env["CCGATE_HOST"] = "0.0.0.0"
        env["CCGATE_PORT"] = str(self.port)
        env.setdefault("CCGATE_CONTAINER_GATEWAY_URL", f"http://host.docker.internal:{self.port}")
        self._env = env
        # The deployment id depends on these alone (others may be JSON strings for the env).
        naming = ("deployment", "database_url", "redis_url", "data_dir", "jwt_secret")
        self._deployment = Settings(
            **{k: v for k, v in settings.items() if k in naming}  # type: ignore[arg-type]
        ).deployment_id
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="ccgate-gw-", suffix=".log")[1])

    def start(self) -> GatewayProcess:
        """Start and wait until /health answers."""
        import urllib.error
        import urllib.request

        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [os.sys.executable, "-m", "gateway.cli", "serve"],
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return True
            except urllib.error.HTTPError:
                return True  # answering, even if degraded
            except OSError:
                assert self.proc is not None and self.proc.poll() is None, self.log_path.read_text()
                return False

        wait_until(healthy, timeout_s=60, what=f"gateway process (log {self.log_path})")
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        """SIGTERM and wait, then remove the deployment's ready network sandboxes."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
        remove_network_sandboxes(self._deployment)
