"""Egress allowlists through a real forward proxy (tinyproxy), with a local HTTPS server:
an allowed domain is reachable through the session's proxy, any other name is refused by the
proxy, and nothing is reachable around it."""

from __future__ import annotations

import datetime
import http.server
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.auth import mint_token
from scripted_model import ScriptedModelServer
from tests.conftest import JWT_SECRET, full_stack_settings
from tests.containers import PostgresContainer, RedisContainer, S3Container
from tests.servers import GatewayServer

pytestmark = pytest.mark.e2e

# Fetches each URL (certificates not checked: reachability is under test) and prints
# {url: status code | "refused: <reason>"}; proxies come from the container's environment.
_FETCH = """
import json, ssl, sys, urllib.request
context = ssl._create_unverified_context()
out = {}
for url in sys.argv[1:]:
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as r:
            out[url] = r.status
    except Exception as exc:
        out[url] = "refused: " + str(exc)[:120]
print(json.dumps(out))
"""


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """An HTTPS server on the host (all addresses, a free port) answering 200 'egress ok'."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"egress ok")

        def log_message(self, *args: Any) -> None:
            pass

    cert, key = _self_signed(tmp_path_factory.mktemp("tls"))
    # A port below the ephemeral range: the firewall's allow rules for the gateways and Redis
    # of earlier tests (only ever added) are all ephemeral ports, so none can open this one.
    server = None
    for port in range(20000, 30000):
        try:
            server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler)
            break
        except OSError:
            continue
    assert server is not None, "no free port in 20000-29999"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()


@pytest.fixture(scope="module")
def egress_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
    s3_server: S3Container,
    scripted_model: ScriptedModelServer,
    https_server: int,
) -> Iterator[GatewayServer]:
    gateway = GatewayServer(
        full_stack_settings(
            tmp_path_factory.mktemp("gw-egress"),
            redis_server,
            postgres_server,
            s3_server,
            scripted_model,
            egress_connect_ports=[https_server],
        )
    ).start()
    yield gateway
    gateway.stop()


async def test_an_allowlisted_domain_is_reachable_and_nothing_else(
    egress_gateway: GatewayServer, https_server: int, docker_client: docker.DockerClient
) -> None:
    token = mint_token(key=JWT_SECRET, user="test-egress", ttl_s=600)
    port = https_server
    async with httpx.AsyncClient(
        base_url=egress_gateway.url, headers={"Authorization": f"Bearer {token}"}, timeout=120
    ) as http:
        bad = await http.post(
            "/api/v1/sessions",
            json={"config": {"egress": {"policy": "allowlist", "domains": ["not a domain"]}}},
        )
        assert bad.status_code == 422 and "domain" in bad.text
        # The allowed name: this host's own name, which the proxy (on the host) resolves to
        # the HTTPS server; localhost would not do (NO_PROXY keeps the container's own
        # loopback off the proxy).
        host_name = socket.gethostname().lower()
        socket.gethostbyname(host_name)  # the test needs the host to resolve its own name
        allow = {"policy": "allowlist", "domains": [host_name]}
        sids = []
        for config in ({"egress": allow}, {}):
            r = await http.post("/api/v1/sessions", json={"config": config})
            assert r.status_code == 201, r.text
            sids.append(r.json()["session_id"])
        allowed_sid, closed_sid = sids
        try:
            # The CLI still reaches the model (the proxy is bypassed for the gateway).
            done = await http.post(
                f"/api/v1/sessions/{allowed_sid}/chat",
                json={"prompt": "echo through", "stream": False},
            )
            assert done.json()["status"] == "completed", done.text
            bridge_ip = egress_gateway.app.state.sessions.network.host_gateway
            urls = [
                f"https://{host_name}:{port}/",  # allowed by name
                f"https://{bridge_ip}:{port}/",  # the same server, a name not on the list
            ]
            allowed = docker_client.containers.get(f"ccgate-{allowed_sid}")
            _, out = allowed.exec_run(["python3", "-c", _FETCH, *urls], user="1000")
            seen = json.loads(out.decode().strip().splitlines()[-1])
            assert seen[urls[0]] == 200, seen
            assert str(seen[urls[1]]).startswith("refused"), seen
            # Around the proxy (no proxy variables): the firewall refuses the host's port.
            direct = f"https://host.docker.internal:{port}/"
            _, out = allowed.exec_run(
                ["env", "-u", "HTTPS_PROXY", "-u", "https_proxy", "python3", "-c", _FETCH, direct],
                user="1000",
            )
            assert str(json.loads(out.decode().splitlines()[-1])[direct]).startswith("refused")
            # A session without an allowlist has no proxy at all.
            closed = docker_client.containers.get(f"ccgate-{closed_sid}")
            env = closed.attrs["Config"]["Env"]
            assert not any(e.upper().startswith("HTTPS_PROXY=") for e in env)
            _, out = closed.exec_run(["python3", "-c", _FETCH, urls[0]], user="1000")
            assert str(json.loads(out.decode().splitlines()[-1])[urls[0]]).startswith("refused")
        finally:
            for sid in sids:
                await http.delete(f"/api/v1/sessions/{sid}")
        # The proxy went with its session.
        assert egress_gateway.app.state.sessions.egress.count == 0
