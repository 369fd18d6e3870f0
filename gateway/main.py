"""create_app(): the FastAPI application; its lifespan opens and closes every client.

Start-up order: database (migrated to the newest revision, retried while it comes up), Redis,
Docker, the artifact store, then the supervised background tasks (event hub, ledger and its
collectors, reaper). Every blocking SDK has its own thread pool; every background task runs
under the Supervisor, which /health/ready consults.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
import urllib3
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from minio import Minio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from gateway import __version__
from gateway.api import about, api_router, health, metrics, model_proxy, tasks
from gateway.bodylimit import BodyLimitMiddleware
from gateway.config import Settings
from gateway.db.engine import make_db_factory, make_engine
from gateway.db.errors import is_outage
from gateway.db.migrate import migrate
from gateway.errors import DependencyUnavailable, GatewayError, RateLimited, Unauthorized
from gateway.executors import BlockingPool
from gateway.logs import RequestIdMiddleware, request_id
from gateway.metrics import Metrics
from gateway.observe import register_gauges
from gateway.services.artifacts import ArtifactStore, LocalArtifactStore, S3ArtifactStore
from gateway.services.container_deaths import DeathWatch
from gateway.services.egress import EgressProxies
from gateway.services.event_hub import EventHub
from gateway.services.job_queue import JobQueue
from gateway.services.job_workspace import JobWorkspaces
from gateway.services.jobs import JobService
from gateway.services.lease import Lease
from gateway.services.ledger import Ledger
from gateway.services.lifecycle_loop import LifecycleLoop
from gateway.services.mcp_profiles import McpProfiles
from gateway.services.model_proxy import ModelProxy
from gateway.services.pool_manager import PoolManager
from gateway.services.ratelimit import UserRateLimiter
from gateway.services.reaper import Reaper
from gateway.services.repositories import RepositoryService
from gateway.services.runtime.docker import DockerRuntime
from gateway.services.sessions import SessionService
from gateway.services.warm_pool import resolve_profiles
from gateway.supervisor import Supervisor

logger = logging.getLogger(__name__)


def make_store(settings: Settings) -> ArtifactStore:
    """S3/MinIO when CCGATE_S3_ENDPOINT is set, else a local directory."""
    pool = BlockingPool("storage", settings.storage_threads)
    if not settings.s3_endpoint:
        return LocalArtifactStore(settings.artifacts_path, pool)
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
            maxsize=max(20, settings.storage_threads),
        ),
    )
    return S3ArtifactStore(client, settings.s3_bucket, pool)


def make_redis(settings: Settings) -> aioredis.Redis:
    """The gateway's Redis client: connect and socket timeouts, and pooled connections that
    a Redis restart broke are retried on a fresh connection instead of failing the request."""
    return aioredis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=5,
        socket_timeout=settings.redis_socket_timeout_s,
        socket_keepalive=True,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError],
    )


def _error(status_code: int, detail: str, code: str, **extra: str) -> JSONResponse:
    return JSONResponse(status_code=status_code, content={"detail": detail, "code": code, **extra})


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; clients are created in the lifespan and kept on ``app.state``."""
    settings = settings or Settings()
    profiles = resolve_profiles(settings)  # a bad CCGATE_WARM_POOL stops the start, named

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        jwt_key = settings.jwt_key()
        engine = make_engine(
            settings.db_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            pool_timeout_s=settings.db_pool_timeout_s,
        )
        await retry(
            retry=retry_if_exception_type((SQLAlchemyError, OSError)),
            stop=stop_after_delay(30),
            wait=wait_exponential(max=2),
            reraise=True,
        )(migrate)(engine)
        metrics_ = Metrics()
        supervisor = Supervisor(
            on_failure=lambda name: metrics_.task_failures.labels(task=name).inc()
        )
        redis = make_redis(settings)
        runtime = DockerRuntime(
            settings.docker_host,
            deployment=settings.deployment_id,
            pool=BlockingPool("docker", settings.docker_threads),
        )
        store = make_store(settings)
        if isinstance(store, S3ArtifactStore):
            try:
                await store.ensure_bucket()
            except DependencyUnavailable as exc:
                logger.warning("artifact bucket not ready: %s", exc)
        hub = EventHub(redis)
        await hub.start(supervisor)
        db_factory = make_db_factory(engine)
        ledger = Ledger(
            settings=settings,
            redis=redis,
            db_factory=db_factory,
            runtime=runtime,
            store=store,
            metrics=metrics_,
            supervisor=supervisor,
            max_attempts=settings.ledger_max_attempts,
            collector_workers=settings.collector_workers,
        )
        await ledger.start()
        deaths = DeathWatch(
            runtime=runtime, redis=redis, db_factory=db_factory, jwt_key=jwt_key, metrics=metrics_
        )
        supervisor.start("container-events", deaths.run)
        reaper = Reaper(
            deaths=deaths,
            runtime=runtime,
            db_factory=db_factory,
            redis=redis,
            jwt_key=jwt_key,
            token_ttl_s=settings.session_token_ttl_s,
            session_acl=settings.session_redis_acl,
            interval_s=settings.reaper_interval_s,
            grace_s=max(settings.reaper_grace_s, settings.stop_timeout_s + 5),
            lease=Lease(
                redis,
                f"reaper:{settings.deployment_id}",
                ttl_s=max(30.0, settings.reaper_interval_s * 3),
            ),
        )
        supervisor.start("reaper", reaper.run)
        app.state.rate_limiter = UserRateLimiter(settings.redis_url, settings.rate_limit, metrics_)
        proxy = ModelProxy(settings=settings, db_factory=db_factory, metrics=metrics_)
        await proxy.start()
        app.state.model_proxy = proxy
        app.state.settings = settings
        app.state.jwt_key = jwt_key
        app.state.engine = engine
        app.state.db_factory = db_factory
        app.state.redis = redis
        app.state.runtime = runtime
        app.state.store = store
        app.state.hub = hub
        app.state.ledger = ledger
        app.state.reaper = reaper
        app.state.supervisor = supervisor
        app.state.metrics = metrics_
        egress = EgressProxies(settings, db_factory)
        supervisor.start("egress-sweep", egress.sweep)
        app.state.sessions = SessionService(
            settings=settings,
            redis=redis,
            runtime=runtime,
            store=store,
            hub=hub,
            jwt_key=jwt_key,
            db_factory=db_factory,
            ledger=ledger,
            metrics=metrics_,
            egress=egress,
        )
        sandboxes = app.state.sessions.sandboxes
        reaper.sandboxes = sandboxes
        supervisor.start("network-sandboxes", sandboxes.run)
        lifecycle = LifecycleLoop(
            app.state.sessions,
            Lease(
                redis,
                f"lifecycle:{settings.deployment_id}",
                ttl_s=max(10.0, settings.lifecycle_interval_s * 5),
            ),
        )
        pool = PoolManager(
            app.state.sessions,
            Lease(redis, f"warm-pool:{settings.deployment_id}", ttl_s=10.0),
            profiles,
        )
        app.state.pool = pool
        app.state.sessions.pool_profiles = profiles
        app.state.sessions.wake_pool = pool.wake
        deaths.on_pool_death = pool.reconcile_soon
        supervisor.start("warm-pool", pool.run)
        app.state.lifecycle = lifecycle
        app.state.loop = asyncio.get_running_loop()
        ledger.on_paused(lifecycle.wake)
        app.state.sessions.wake_lifecycle = lifecycle.wake
        supervisor.start("lifecycle", lifecycle.run)
        secret_box = settings.secret_box()
        repositories = RepositoryService(settings, db_factory, secret_box, metrics_)
        app.state.mcp_profiles = McpProfiles(secret_box)
        app.state.repositories = repositories
        supervisor.start("repositories", repositories.recover)
        workspaces = JobWorkspaces(settings, runtime)
        job_queue = JobQueue(
            settings, db_factory, app.state.sessions, workspaces, repositories, metrics_
        )
        app.state.jobs = JobService(
            settings, workspaces, repositories, app.state.sessions, job_queue.wake
        )
        supervisor.start("jobs", job_queue.run)
        register_gauges(app)
        try:
            await app.state.sessions.network.ensure()
        except DependencyUnavailable as exc:
            logger.warning("sessions network not ready yet (retried at the first create): %s", exc)
        try:
            yield
        finally:
            await supervisor.close()
            await job_queue.close()
            await repositories.close()
            await proxy.close()
            await egress.close()
            await ledger.close()
            await hub.close()
            await redis.aclose()
            await runtime.close()
            store.close()
            await engine.dispose()

    app = FastAPI(
        title="ccgate",
        version=__version__,
        summary="Claude Code as a service: one container per session, streamed over WebSocket.",
        lifespan=lifespan,
    )
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        skip_prefixes=("/model/",),
        larger=(
            (
                re.compile(r"/api/v1/jobs/[^/]+/files"),
                settings.job_max_file_bytes * settings.job_max_files + 1024 * 1024,
                "CCGATE_JOB_MAX_FILE_BYTES * CCGATE_JOB_MAX_FILES",
            ),
            (
                re.compile(r"/api/(v1/jobs|tasks)/[^/]+/workspace"),
                settings.job_max_zip_bytes + 1024 * 1024,
                "CCGATE_JOB_MAX_ZIP_BYTES",
            ),
        ),
    )
    app.add_middleware(RequestIdMiddleware)
    app.include_router(api_router)
    app.include_router(tasks.router)
    app.include_router(health.router)
    app.include_router(about.router)
    app.include_router(metrics.router)
    app.include_router(model_proxy.router)

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        if exc.status_code == 500:  # a plain GatewayError: a bug; 503 and 504 are not
            return _internal(request, exc)
        response = _error(exc.status_code, exc.message, exc.code)
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = "Bearer"
        if isinstance(exc, RateLimited):
            response.headers["Retry-After"] = str(exc.retry_after_s)
            request.app.state.metrics.rate_limited.inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors())
        first = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors[:3]
        )
        return JSONResponse(
            status_code=422,
            content={"detail": first or "invalid request", "code": "invalid_request",
                     "errors": [{k: e.get(k) for k in ("loc", "msg", "type")} for e in errors]},
        )  # fmt: skip

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {
            400: "bad_request",
            401: "unauthorized",
            403: "forbidden",
            404: "not_found",
            405: "method_not_allowed",
        }
        response = _error(
            exc.status_code, str(exc.detail), codes.get(exc.status_code, "http_error")
        )
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(SQLAlchemyError)
    async def _database_error(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        if is_outage(exc):
            logger.warning("database unavailable: %s", exc)
            return _error(
                503, f"database is unavailable: {type(exc).__name__}", "dependency_unavailable"
            )
        return _internal(request, exc)

    @app.exception_handler(RedisError)
    async def _redis_down(request: Request, exc: RedisError) -> JSONResponse:
        return _error(503, f"redis is unavailable: {exc}", "dependency_unavailable")

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        return _internal(request, exc)

    def _internal(request: Request, exc: BaseException) -> JSONResponse:
        error_id = uuid.uuid4().hex[:12]
        rid = str(getattr(request.state, "request_id", None) or request_id.get())
        logger.error(
            "internal error %s on %s %s",
            error_id,
            request.method,
            request.url.path,
            exc_info=exc,
            extra={"request_id": rid, "error_id": error_id},
        )
        state_metrics = getattr(request.app.state, "metrics", None)
        if state_metrics is not None:
            state_metrics.errors.inc()
        response = _error(
            500,
            f"internal error {error_id}: this is a bug in ccgate; the log has the details",
            "internal_error",
            error_id=error_id,
        )
        response.headers["X-Request-ID"] = rid
        return response

    return app
