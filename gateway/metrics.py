"""Prometheus metrics of one gateway process (``GET /metrics``).

Counters and histograms are updated where things happen; gauges that describe current state
(ledger lag, hub subscriptions, pool use, executor queues, sessions by status) are read at
scrape time through callbacks registered by the lifespan, so they are never stale.
Each app has its own registry (several gateways may share a process in tests).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

GaugeReading = Callable[[], Iterable[tuple[dict[str, str], float]]]
"""Returns (labels, value) pairs of one gauge, read at scrape time."""


class _Gauges(Collector):
    def __init__(self) -> None:
        self.readings: dict[str, tuple[str, list[str], GaugeReading]] = {}

    def collect(self) -> Iterable[Metric]:
        for name, (doc, labels, read) in self.readings.items():
            family = GaugeMetricFamily(name, doc, labels=labels)
            try:
                values = list(read())
            except Exception:
                logger.exception("metrics: reading %s failed", name)
                continue
            for label_values, value in values:
                family.add_metric([label_values[k] for k in labels], value)
            yield family


class Metrics:
    """The registry and every metric the gateway exports (names start with ``ccgate_``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_persisted = Counter(
            "ccgate_ledger_events_persisted", "Events written to the database", registry=r
        )
        self.dead_letters = Counter(
            "ccgate_ledger_dead_letters",
            "Stream entries the ledger gave up on (kept in the deadletter table)",
            ["reason"],
            registry=r,
        )
        self.ledger_batch_seconds = Histogram(
            "ccgate_ledger_batch_seconds", "Time to persist one batch of events", registry=r
        )
        self.artifact_seconds = Histogram(
            "ccgate_artifact_collect_seconds",
            "Time to collect one turn's artifacts into the store",
            registry=r,
        )
        self.artifact_bytes = Counter(
            "ccgate_artifact_bytes", "Bytes copied into the artifact store", registry=r
        )
        self.slow_consumers = Counter(
            "ccgate_hub_slow_consumer_cutoffs",
            "Clients disconnected because they fell a whole buffer behind",
            registry=r,
        )
        self.turns = Counter(
            "ccgate_turns", "Turns finished, by final status", ["outcome"], registry=r
        )
        self.container_start_seconds = Histogram(
            "ccgate_container_start_seconds",
            "POST /sessions: from the request to the container started",
            buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
            registry=r,
        )
        self.tokens = Counter(
            "ccgate_tokens", "Model tokens metered by the model proxy", ["kind"], registry=r
        )
        self.cost_usd = Counter(
            "ccgate_cost_usd", "Cost in USD metered by the model proxy", registry=r
        )
        self.proxy_requests = Counter(
            "ccgate_proxy_requests",
            "Model proxy requests by route and status code",
            ["route", "status"],
            registry=r,
        )
        self.rate_limit_errors = Counter(
            "ccgate_rate_limit_errors",
            "Requests let through unlimited because the rate limiter's Redis failed",
            registry=r,
        )
        self.rate_limited = Counter(
            "ccgate_rate_limited",
            "Requests refused with 429 by the per-user rate limit",
            registry=r,
        )
        self.proxy_refusals = Counter(
            "ccgate_proxy_refusals",
            "Model requests refused before upstream (auth, budget_exhausted, budget_busy, ...)",
            ["reason"],
            registry=r,
        )
        self.proxy_first_byte_seconds = Histogram(
            "ccgate_proxy_upstream_first_byte_seconds",
            "Upstream time to response headers, per forwarded request",
            registry=r,
        )
        self.proxy_record_failures = Counter(
            "ccgate_proxy_record_failures",
            "Metered requests whose recording failed (retried in the background; 'lost' "
            "when the retries ran out)",
            ["outcome"],
            registry=r,
        )
        self.pauses = Counter(
            "ccgate_session_pauses",
            "Session containers released while the session stays open, by reason "
            "(idle, requested, oom, killed, exited, crashed)",
            ["reason"],
            registry=r,
        )
        self.resume_seconds = Histogram(
            "ccgate_session_resume_seconds",
            "Paused session: from the resume's start to the new container's ready event",
            buckets=(0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
            registry=r,
        )
        self.container_deaths = Counter(
            "ccgate_container_deaths",
            "Session containers that died without saying exited, by cause (oom, killed, exited)",
            ["cause"],
            registry=r,
        )
        self.container_ooms = Counter(
            "ccgate_container_ooms",
            "OOM kills inside session containers (the engine's oom events)",
            registry=r,
        )
        self.death_notice_seconds = Histogram(
            "ccgate_container_death_notice_seconds",
            "From a container's death (the engine's event time) to its stream being closed",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 30),
            registry=r,
        )
        self.silent_turns = Counter(
            "ccgate_turns_silent",
            "Running turns flagged for producing no event for CCGATE_TURN_SILENCE_S",
            registry=r,
        )
        self.repo_operations = Counter(
            "ccgate_repo_operations",
            "Repository clones and pulls finished, by operation (clone|pull) and outcome "
            "(ok|failed)",
            ["operation", "outcome"],
            registry=r,
        )
        self.repo_operation_seconds = Histogram(
            "ccgate_repo_operation_seconds",
            "A repository clone or pull from its start to its outcome, by operation",
            ["operation"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.jobs_finished = Counter(
            "ccgate_jobs_finished",
            "Jobs that reached a final status, by status",
            ["status"],
            registry=r,
        )
        self.job_workspace_seconds = Histogram(
            "ccgate_job_workspace_seconds",
            "Making a job's workspace (after any pull), by mode (overlay|copy|empty)",
            ["mode"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=r,
        )
        self.job_queue_wait_seconds = Histogram(
            "ccgate_job_queue_wait_seconds",
            "A job's time in the queue, from queued to taken by a runner",
            buckets=(0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 1800, 3600),
            registry=r,
        )
        self.pool_claims = Counter(
            "ccgate_pool_claims",
            "Creates served by a warm-pool container, by pool profile",
            ["profile"],
            registry=r,
        )
        self.pool_misses = Counter(
            "ccgate_pool_misses",
            "Creates that started cold while warm pools are configured, by reason "
            "(no_profile: config matches none; workspace: not an empty workspace; empty: "
            "no ready container; dead: the claimed container did not answer)",
            ["reason"],
            registry=r,
        )
        self.pool_refill_seconds = Histogram(
            "ccgate_pool_refill_seconds",
            "A warm-pool container: from its start to its CLI ready, by profile",
            ["profile"],
            buckets=(0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60),
            registry=r,
        )
        self.pool_refill_failures = Counter(
            "ccgate_pool_refill_failures",
            "Warm-pool containers that failed to start or to get ready (removed), by profile",
            ["profile"],
            registry=r,
        )
        self.pool_discarded = Counter(
            "ccgate_pool_discarded",
            "Warm-pool containers removed unclaimed, by reason (dead, stale, surplus, "
            "profile_changed)",
            ["reason"],
            registry=r,
        )
        self.netns_claims = Counter(
            "ccgate_network_sandbox_claims",
            "Container starts that asked for a network sandbox, by result (claimed; empty: "
            "none ready; redis: unreachable; failed: the sandbox could not be joined)",
            ["result"],
            registry=r,
        )
        self.task_failures = Counter(
            "ccgate_task_failures", "Crashes of supervised background tasks", ["task"], registry=r
        )
        self.errors = Counter(
            "ccgate_internal_errors", "Requests that ended in a 500 (bugs)", registry=r
        )
        self._gauges = _Gauges()
        r.register(self._gauges)
        self.async_readings: dict[str, tuple[str, list[str], AsyncReading]] = {}

    def gauge(self, name: str, doc: str, labels: list[str], read: GaugeReading) -> None:
        """Register a gauge read at scrape time."""
        self._gauges.readings[name] = (doc, labels, read)

    def async_gauge(self, name: str, doc: str, labels: list[str], read: AsyncReading) -> None:
        """Register a gauge whose reading needs I/O (e.g. a database count); the /metrics
        route awaits it before rendering."""
        self.async_readings[name] = (doc, labels, read)

    async def refresh_async(self) -> None:
        """Await the I/O-bound readings and publish their values for the next collect."""
        for name, (doc, labels, read) in self.async_readings.items():
            try:
                values = await read()
            except Exception as exc:
                logger.warning("metrics: reading %s failed: %s", name, exc)
                continue
            self._gauges.readings[name] = (doc, labels, _constant(values))


AsyncReading = Callable[[], Awaitable[list[tuple[dict[str, str], float]]]]


def _constant(values: list[tuple[dict[str, str], float]]) -> GaugeReading:
    return lambda: values
