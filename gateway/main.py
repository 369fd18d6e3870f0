"""create_app(): the FastAPI application; its lifespan opens and closes every client."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
import urllib3
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from minio import Minio
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from gateway.api import api_router, health
from gateway.config import Settings
from gateway.db.engine import create_tables, make_db_factory, make_engine
from gateway.deps import Unauthorized
from gateway.errors import DependencyUnavailable, GatewayError
from gateway.services.artifacts import ArtifactStore, LocalArtifactStore, S3ArtifactStore
from gateway.services.events import EventHub
from gateway.services.ledger import Ledger
from gateway.services.reaper import Reaper
from gateway.services.runtime.docker import DockerRuntime
from gateway.services.sessions import SessionService

logger = logging.getLogger(__name__)


def make_store(settings: Settings) -> ArtifactStore:
    """S3/MinIO when CCGATE_S3_ENDPOINT is set, else a local directory."""
    if not settings.s3_endpoint:
        return LocalArtifactStore(settings.artifacts_path)
    client = Minio(
        settings.s3_endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None,
        secure=settings.s3_secure,
        region=settings.s3_region,
        http_client=urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=3, read=60),
            retries=urllib3.Retry(
                total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)
            ),
            maxsize=20,
        ),
    )
    return S3ArtifactStore(client, settings.s3_bucket)


def _error(status_code: int, detail: str, code: str) -> JSONResponse:
    return JSONResponse(status_code=status_code, content={"detail": detail, "code": code})


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; clients are created in the lifespan and kept on ``app.state``."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        jwt_key = settings.jwt_key()
        engine = make_engine(settings.db_url)
        await retry(
            retry=retry_if_exception_type((SQLAlchemyError, OSError)),
            stop=stop_after_delay(30),
            wait=wait_exponential(max=2),
            reraise=True,
        )(create_tables)(engine)
        redis = aioredis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=5, health_check_interval=30
        )
        runtime = DockerRuntime(settings.docker_host, deployment=settings.deployment_id)
        store = make_store(settings)
        if isinstance(store, S3ArtifactStore):
            try:
                await store.ensure_bucket()
            except DependencyUnavailable as exc:
                logger.warning("artifact bucket not ready: %s", exc)
        hub = EventHub(redis)
        await hub.start()
        db_factory = make_db_factory(engine)
        ledger = Ledger(
            settings=settings, redis=redis, db_factory=db_factory, runtime=runtime, store=store
        )
        await ledger.start()
        reaper = Reaper(
            runtime=runtime,
            db_factory=db_factory,
            redis=redis,
            jwt_key=jwt_key,
            token_ttl_s=settings.session_token_ttl_s,
            session_acl=settings.session_redis_acl,
            interval_s=settings.reaper_interval_s,
            grace_s=max(settings.reaper_grace_s, settings.stop_timeout_s + 5),
        )
        await reaper.start()
        app.state.settings = settings
        app.state.jwt_key = jwt_key
        app.state.db_factory = db_factory
        app.state.redis = redis
        app.state.runtime = runtime
        app.state.store = store
        app.state.ledger = ledger
        app.state.reaper = reaper
        app.state.sessions = SessionService(
            settings=settings,
            redis=redis,
            runtime=runtime,
            store=store,
            hub=hub,
            jwt_key=jwt_key,
        )
        try:
            yield
        finally:
            await reaper.close()
            await ledger.close()
            await hub.close()
            await redis.aclose()
            await runtime.close()
            await engine.dispose()

    app = FastAPI(
        title="ccgate",
        version="0.1.0",
        summary="Claude Code as a service: one container per session, streamed over WebSocket.",
        lifespan=lifespan,
    )
    app.include_router(api_router)
    app.include_router(health.router)

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return _error(exc.status_code, exc.message, exc.code)

    @app.exception_handler(Unauthorized)
    async def _unauthorized(request: Request, exc: Unauthorized) -> JSONResponse:
        response = _error(401, str(exc), "unauthorized")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(SQLAlchemyError)
    async def _database_down(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        logger.warning("database error: %s", exc)
        return _error(
            503, f"database is unavailable: {type(exc).__name__}", "dependency_unavailable"
        )

    @app.exception_handler(RedisError)
    async def _redis_down(request: Request, exc: RedisError) -> JSONResponse:
        return _error(503, f"redis is unavailable: {exc}", "dependency_unavailable")

    return app
