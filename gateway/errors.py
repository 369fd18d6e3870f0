"""The gateway's error tree and its one mapping to HTTP.

::

    GatewayError                      500  a bug (answered with an error id; the log has it)
    ├── Unauthorized                  401  no valid bearer token (WWW-Authenticate: Bearer)
    ├── Forbidden                     403  a session token asked for something outside its scope
    ├── NotFound                      404  unknown session, or one owned by someone else
    ├── Conflict                      409  e.g. chat on a stopped session
    │   └── SpawnRefused              409  a spawn limit (named, with its value) would be exceeded
    ├── InvalidRequest                422  input that passed the schema but cannot be honoured
    │   └── CallbackRefused           422  a spawn callback aimed at a private or loopback address
    ├── RequestTooLarge               413  a request body over CCGATE_MAX_REQUEST_BYTES
    ├── RateLimited                   429  the user's CCGATE_RATE_LIMIT is spent (Retry-After)
    ├── TurnTimeout                   504  a stream=false chat waited longer than its timeout
    └── DependencyUnavailable         503  database, redis, storage or docker is down
        └── ContainerStartFailed      503  docker answered but the session container did not start

Foreign exceptions are translated at the boundary: SQLAlchemy and Redis outages become 503s
naming the dependency (``gateway.db.errors.is_outage``); anything else is a bug (500).
Internal signals that never reach a client live beside their code (``SlowConsumer`` in
services/events.py, ``StartupFailed`` in the wrapper).
"""

from __future__ import annotations

from typing import ClassVar


class GatewayError(Exception):
    """Root of every error the API reports; ``status_code`` and ``code`` shape the response."""

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unauthorized(GatewayError):
    """No valid bearer token."""

    status_code = 401
    code = "unauthorized"


class Forbidden(GatewayError):
    """The caller is known but this operation is outside what its token allows."""

    status_code = 403
    code = "forbidden"


class NotFound(GatewayError):
    """The resource does not exist for this caller."""

    status_code = 404
    code = "not_found"


class Conflict(GatewayError):
    """The resource is in a state that forbids the operation."""

    status_code = 409
    code = "conflict"


class SpawnRefused(Conflict):
    """A spawn limit would be exceeded; the message names the limit and its value."""

    code = "spawn_refused"


class InvalidRequest(GatewayError):
    """The request is well-formed but cannot be honoured as given."""

    status_code = 422
    code = "invalid_request"


class CallbackRefused(InvalidRequest):
    """A spawn callback URL is or resolves to an address the gateway must not call."""

    code = "callback_refused"


class RequestTooLarge(GatewayError):
    """The request body is longer than the gateway accepts."""

    status_code = 413
    code = "request_too_large"


class RateLimited(GatewayError):
    """Too many requests from one user; ``retry_after_s`` goes into Retry-After."""

    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AdmissionRefused(RateLimited):
    """Over an admission limit (services/admission.py): 429 with Retry-After; ``limit`` names
    the setting that refused."""

    code = "admission_refused"

    def __init__(self, message: str, *, limit: str, retry_after_s: int) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.limit = limit


class TurnTimeout(GatewayError):
    """A synchronous chat did not finish in time; the turn keeps running."""

    status_code = 504
    code = "turn_timeout"


class DependencyUnavailable(GatewayError):
    """A backing service failed; ``dependency`` is database | redis | storage | docker."""

    status_code = 503
    code = "dependency_unavailable"

    def __init__(self, dependency: str, detail: str) -> None:
        super().__init__(f"{dependency} is unavailable: {detail}")
        self.dependency = dependency


class ContainerStartFailed(DependencyUnavailable):
    """Docker is reachable but the session container could not be created or started."""

    code = "container_start_failed"

    def __init__(self, detail: str) -> None:
        super().__init__("docker", detail)
