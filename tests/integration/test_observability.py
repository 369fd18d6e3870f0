"""Request ids, errors that say bug or outage, /metrics and the health probes (real gateway on
SQLite and a real Redis; no container is started)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway import __version__
from gateway.auth import mint_token
from gateway.errors import TurnTimeout
from gateway.logs import configure_logging
from tests.conftest import JWT_SECRET, make_settings
from tests.containers import RedisContainer
from tests.servers import GatewayServer


@pytest.fixture
def gateway(tmp_path: Path, redis_server: RedisContainer) -> Iterator[GatewayServer]:
    server = GatewayServer(make_settings(tmp_path, redis_url=redis_server.url))

    async def boom() -> None:
        raise RuntimeError("a bug in a route")

    async def slow() -> None:
        raise TurnTimeout("turn t is still running after 1s; poll GET …")

    server.app.add_api_route("/test-boom", boom)
    server.app.add_api_route("/test-slow", slow)
    yield server.start()
    server.stop()


def _headers(user: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(key=JWT_SECRET, user=user, ttl_s=60)}"}


async def test_every_response_carries_the_request_id_and_log_lines_too(
    gateway: GatewayServer, caplog: pytest.LogCaptureFixture
) -> None:
    configure_logging("json")
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        given = await http.get("/health/live", headers={"X-Request-ID": "req-42"})
        made = await http.get("/health/live")
        with caplog.at_level(logging.ERROR):
            failed = await http.get("/test-boom", headers={"X-Request-ID": "req-boom"})
    assert given.headers["x-request-id"] == "req-42"
    assert len(made.headers["x-request-id"]) == 16
    assert failed.headers["x-request-id"] == "req-boom"
    records = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert records and records[0].request_id == "req-boom"  # type: ignore[attr-defined]


async def test_a_bug_is_a_500_with_an_error_id_that_the_log_names(
    gateway: GatewayServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        with caplog.at_level(logging.ERROR):
            response = await http.get("/test-boom")
    assert response.status_code == 500
    body = response.json()
    assert body["code"] == "internal_error" and body["error_id"] in body["detail"]
    assert any(body["error_id"] in r.getMessage() and r.exc_info for r in caplog.records)


async def test_a_turn_timeout_is_a_504_not_a_bug(
    gateway: GatewayServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        with caplog.at_level(logging.ERROR):
            response = await http.get("/test-slow")
    assert response.status_code == 504, response.text
    assert response.json()["code"] == "turn_timeout" and "poll GET" in response.json()["detail"]
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]


async def test_bad_input_is_a_422_that_says_what_to_fix(gateway: GatewayServer) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, headers=_headers()) as http:
        response = await http.post("/api/v1/sessions", json={"parent_session_id": "x" * 100})
    assert response.status_code == 422
    assert "36 characters" in response.text


async def test_metrics_export_the_gateway_state(gateway: GatewayServer) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, headers=_headers()) as http:
        await http.get(f"/api/v1/sessions/{uuid.uuid4()}")
        response = await http.get("/metrics")
    assert response.status_code == 200
    text = response.text
    for name in (
        "ccgate_ledger_lag_events",
        "ccgate_ledger_dead_letters_total",
        "ccgate_hub_subscriptions",
        "ccgate_hub_slow_consumer_cutoffs_total",
        "ccgate_db_pool_in_use",
        'ccgate_executor_queued{pool="docker"}',
        'ccgate_executor_queued{pool="storage"}',
        "ccgate_turns_total",
        "ccgate_container_start_seconds",
        "ccgate_tokens_total",
        "ccgate_cost_usd_total",
        'ccgate_task_up{task="ledger"} 1.0',
        'ccgate_task_up{task="event-hub"} 1.0',
        'ccgate_task_up{task="reaper"} 1.0',
    ):
        assert name in text, name


async def test_readiness_checks_dependencies_and_background_tasks(
    gateway: GatewayServer,
) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        ready = await http.get("/health/ready")
        live = await http.get("/health/live")
    assert ready.status_code == 200, ready.text
    assert set(ready.json()["checks"]) == {"database", "redis", "storage", "docker", "tasks"}
    assert live.json() == {"alive": True}
    assert ready.json()["ready"] is True and ready.json()["status"] == "healthy"


async def test_cc_docker_health_and_service_description(gateway: GatewayServer) -> None:
    """CC-Docker's own API tests (tests/test_api.py there), run against ccgate: /health has
    status, version and components; /health/live is {"alive": true}; / and /api/v1 describe
    the service."""
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        health = (await http.get("/health")).json()
        root = await http.get("/")
        api = await http.get("/api/v1")
    assert health["status"] == "healthy" and health["version"] == __version__
    assert health["components"] == dict.fromkeys(
        ("database", "redis", "storage", "docker"), "healthy"
    )
    assert root.status_code == 200 and api.status_code == 200
    assert root.json()["name"] == "ccgate" and root.json()["version"] == __version__
    assert root.json()["docs"] == "/docs"
    assert api.json()["version"] == "v1" and api.json()["service_version"] == __version__
    endpoints = api.json()["endpoints"]
    assert endpoints["sessions"] == "/api/v1/sessions" and endpoints["usage"] == "/api/v1/usage"
    assert endpoints["health"] == "/health" and endpoints["metrics"] == "/metrics"
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        for path in endpoints.values():  # every advertised endpoint exists (auth aside)
            if "{" not in path:
                assert (await http.get(path)).status_code in (200, 401), path
