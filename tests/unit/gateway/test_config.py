"""Settings from the environment and their derived values."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.config import Settings


def test_defaults_are_an_embedded_sqlite_database_and_local_artifacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    settings = Settings(data_dir=tmp_path)
    assert settings.db_url == f"sqlite+aiosqlite:///{tmp_path}/ccgate.db"
    assert settings.artifacts_path == tmp_path / "artifacts"
    assert settings.s3_endpoint is None


def test_database_url_from_the_environment_uses_asyncpg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@db:5432/ccgate")
    assert Settings().db_url == "postgresql+asyncpg://u:p@db:5432/ccgate"
    monkeypatch.setenv("DATABASE_URL", "postgres://u@db/x")
    assert Settings().db_url == "postgresql+asyncpg://u@db/x"


def test_redis_url_and_prefixed_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:pw@127.0.0.1:6400/2")
    monkeypatch.setenv("CCGATE_CONTAINER_MEMORY", "512m")
    settings = Settings()
    assert settings.redis_url == "redis://:pw@127.0.0.1:6400/2"
    assert settings.container_memory == "512m"


def test_containers_reach_a_loopback_redis_through_the_host_gateway() -> None:
    settings = Settings(redis_url="redis://:pw@127.0.0.1:6400/2")
    assert settings.container_redis_url("u", "p") == "redis://u:p@host.docker.internal:6400/2"
    assert settings.container_redis_url(None, None) == "redis://:pw@host.docker.internal:6400/2"
    compose = Settings(redis_url="redis://redis:6379/0", container_redis_host="redis:6379")
    assert compose.container_redis_url("u", "p") == "redis://u:p@redis:6379/0"


def test_production_refuses_to_run_without_an_explicit_secret() -> None:
    with pytest.raises(ValidationError, match="CCGATE_JWT_SECRET"):
        Settings(environment="production")


def test_development_secret_is_generated_once_and_private(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    key = settings.jwt_key()
    assert len(key) > 40 and Settings(data_dir=tmp_path).jwt_key() == key
    mode = stat.S_IMODE((tmp_path / "jwt-secret").stat().st_mode)
    assert mode == 0o600
