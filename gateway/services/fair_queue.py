"""The job queue's order: fair across users (pure; unit-tested).

Each user's queued jobs run in the order they were queued; users take turns — in each round
every user with queued jobs gets one: users with fewer jobs running first, then the user whose
last job started longest ago (so two users at one job each alternate), then who has waited
longest. The order is what the dispatcher follows (skipping a user at their concurrency
limit) and what ``queue_position`` shows.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime


@dataclass(frozen=True)
class Queued:
    """A queued job: its id, owner and when it was queued."""

    job_id: str
    owner: str
    queued_at: datetime


@dataclass(frozen=True)
class QueueState:
    """What the order depends on: the queued jobs, how many jobs each user has running, and
    when each user's last job started."""

    queued: list[Queued]
    running: dict[str, int] = field(default_factory=dict)
    last_started: dict[str, datetime] = field(default_factory=dict)


_NEVER = datetime.min.replace(tzinfo=UTC)


def fair_order(state: QueueState) -> list[Queued]:
    """The queued jobs in the order they will be dispatched."""
    queued, running = state.queued, state.running
    by_owner: dict[str, list[Queued]] = defaultdict(list)
    for job in sorted(queued, key=lambda q: (q.queued_at, q.job_id)):
        by_owner[job.owner].append(job)
    owners = sorted(
        by_owner,
        key=lambda o: (
            running.get(o, 0),
            state.last_started.get(o, _NEVER),
            by_owner[o][0].queued_at,
            o,
        ),
    )
    order: list[Queued] = []
    depth = 0
    while len(order) < len(queued):
        for owner in owners:
            jobs = by_owner[owner]
            if depth < len(jobs):
                order.append(jobs[depth])
        depth += 1
    return order


def next_to_run(state: QueueState, *, total_limit: int, per_user_limit: int) -> Queued | None:
    """The job to dispatch now: the first in :func:`fair_order` whose user is under
    ``per_user_limit``; None when nothing is queued or ``total_limit`` jobs already run."""
    if sum(state.running.values()) >= total_limit:
        return None
    for job in fair_order(state):
        if state.running.get(job.owner, 0) < per_user_limit:
            return job
    return None
