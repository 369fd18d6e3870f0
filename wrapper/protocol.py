"""The wire contract between the gateway and the wrapper: event envelope, messages, Redis keys.

Both sides import this module; the wrapper never imports the gateway. It depends on the standard
library only, so the session image stays small and the hot path stays cheap.

Redis layout for one session ``<sid>`` (every key starts with ``ccgate:session:<sid>:`` so a
per-session Redis ACL user ``~ccgate:session:<sid>:*`` / ``&ccgate:session:<sid>:*`` covers it):

=====================================  =========  ===========================================
key                                    type       written by -> read by
=====================================  =========  ===========================================
``ccgate:session:<sid>:spec``          string     gateway -> wrapper: SessionSpec JSON
``ccgate:session:<sid>:input``         list       gateway RPUSH -> wrapper BLPOP: TurnRequest
``ccgate:session:<sid>:control``       list       gateway RPUSH -> wrapper BLPOP: ControlMessage
``ccgate:session:<sid>:events``        stream     wrapper XADD -> gateway XRANGE/XREADGROUP;
                                                  entry id ``<seq>-0``, one field ``e`` holding
                                                  the envelope JSON; capped with MAXLEN ~
``ccgate:session:<sid>:live``          channel    wrapper PUBLISH -> gateway SUBSCRIBE: the
                                                  same envelope JSON, for live delivery
``ccgate:session:<sid>:token``         string     gateway SET EX (renewed) -> wrapper: the
                                                  session's own JWT for the ccgate MCP tools
=====================================  =========  ===========================================
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

KEY_PREFIX = "ccgate"
ENVELOPE_FIELD = "e"
"""Name of the single field of each events-stream entry; its value is the envelope JSON."""

LEDGER_GROUP = "ccgate-ledger"
"""Consumer group through which gateway replicas persist session events to the database."""


def session_prefix(session_id: str) -> str:
    """Prefix shared by every Redis key and channel of one session."""
    return f"{KEY_PREFIX}:session:{session_id}:"


def spec_key(session_id: str) -> str:
    """String key holding the session's SessionSpec JSON (gateway writes, wrapper reads)."""
    return f"{session_prefix(session_id)}spec"


def input_key(session_id: str) -> str:
    """List of TurnRequest JSON, consumed one turn at a time by the wrapper."""
    return f"{session_prefix(session_id)}input"


def control_key(session_id: str) -> str:
    """List of ControlMessage JSON (interrupt), consumed by the wrapper at any time."""
    return f"{session_prefix(session_id)}control"


def events_key(session_id: str) -> str:
    """Capped Redis Stream of event envelopes; entry ids are ``<seq>-0``."""
    return f"{session_prefix(session_id)}events"


def live_channel(session_id: str) -> str:
    """Pub/sub channel carrying each envelope as it is appended to the events stream."""
    return f"{session_prefix(session_id)}live"


def token_key(session_id: str) -> str:
    """String key holding the session-scoped JWT the ccgate MCP tools use (expires with it)."""
    return f"{session_prefix(session_id)}token"


def claim_key(slot_id: str) -> str:
    """List holding the Claim JSON that binds a warm-pool container (whose Redis identity is
    its slot id) to a session; the gateway pushes it once, the wrapper BLPOPs it."""
    return f"{session_prefix(slot_id)}claim"


def pool_ready_key(slot_id: str) -> str:
    """List the wrapper of a warm-pool container pushes its readiness JSON to (CLI launched,
    ``initialize`` answered, MCP servers connected); the gateway's pool BLPOPs it."""
    return f"{session_prefix(slot_id)}pool-ready"


def redis_username(session_id: str) -> str:
    """Name of the per-session Redis ACL user the session's container logs in as."""
    return f"ccgate-session-{session_id}"


def pool_claims_key(profile: str) -> str:
    """Counter of a warm pool's claims in the last minute (expires 60 s after the first): the
    pool grows towards its max_size while claims are frequent. Outside session prefixes."""
    return f"{KEY_PREFIX}:pool:{profile}:recent-claims"


def netns_free_key(deployment: str, network: str) -> str:
    """List of the ids of ready network sandboxes on ``network`` (the gateway's; LPOP claims
    one). Outside every session's key prefix, so no container can touch it."""
    return f"{KEY_PREFIX}:netns:{deployment}:{network}:free"


def lease_key(name: str) -> str:
    """A gateway-wide lease (string: the holder's id, with a TTL): one replica at a time runs
    the task ``name``. Outside every session's key prefix, so no container can touch it."""
    return f"{KEY_PREFIX}:lease:{name}"


def stream_id(seq: int) -> str:
    """Redis Stream entry id of the event with this seq (seq starts at 1)."""
    return f"{seq}-0"


def seq_of_stream_id(entry_id: str | bytes) -> int:
    """Inverse of :func:`stream_id`."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


class EventType(StrEnum):
    """Envelope types the wrapper emits itself; CLI lines keep the CLI's own ``type``."""

    READY = "ready"  # the CLI process is up and the wrapper takes turns
    TURN_STARTED = "turn_started"  # a prompt was written to the CLI's stdin
    TURN_COMPLETED = "turn_completed"  # the turn ended (CLI result, timeout or CLI death)
    ERROR = "error"  # something went wrong that the client should see
    CLI_RESTARTED = "cli_restarted"  # the CLI died and was restarted with --resume
    EXITED = "exited"  # the wrapper is leaving; the last event of a container
    CHILD_SPAWNED = "child_spawned"  # (gateway) a child session was created under this one
    CHILD_RESULT = "child_result"  # (gateway) a child's turn finished successfully
    CHILD_FAILED = "child_failed"  # (gateway) a child's turn failed, or the child died
    CHILD_STOPPED = "child_stopped"  # (gateway) a child was stopped or deleted
    CONTAINER_OOM = "container_oom"  # (gateway) a process of the container was OOM-killed


CHILD_EVENTS = frozenset(
    {
        EventType.CHILD_SPAWNED,
        EventType.CHILD_RESULT,
        EventType.CHILD_FAILED,
        EventType.CHILD_STOPPED,
    }
)
GATEWAY_NOTICES = CHILD_EVENTS | {EventType.CONTAINER_OOM}
"""Event types the gateway asks a wrapper to publish (signed; relayed in the stream)."""


class TurnOutcome(StrEnum):
    """How a turn ended: ``turn_completed``'s ``outcome`` field (ccgate's own, beside the
    CLI's ``subtype`` and ``terminal_reason``)."""

    COMPLETED = "completed"  # the CLI's result, not an error
    ERROR = "error"  # the CLI's result, an error (API error, max turns, ...)
    INTERRUPTED = "interrupted"  # the CLI honoured an interrupt (client, or a stop)
    TIMEOUT = "timeout"  # the turn's deadline passed (interrupted, or killed if it ignored it)
    KILLED = "killed"  # the CLI ignored an interrupt and was killed, or the container was
    OOM = "oom"  # the container ran out of memory
    EXITED = "exited"  # the container or the CLI exited during the turn


CONTAINER_DEATH_REASONS = {
    TurnOutcome.OOM: "container_oom",
    TurnOutcome.KILLED: "container_killed",
    TurnOutcome.EXITED: "container_exited",
}
"""``terminal_reason`` of a turn ended by its container's death (written by the gateway)."""

APPEND_AND_PUBLISH_SCRIPT = """
local ok = redis.pcall('XADD', KEYS[1], ARGV[1], 'e', ARGV[2])
if type(ok) == 'table' and ok.err then
  if string.find(ok.err, 'equal or smaller', 1, true) then
    return 0
  end
  return redis.error_reply(ok.err)
end
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
"""
"""Append one envelope to a session's events stream with the explicit id ``<seq>-0`` and
publish it (KEYS: events stream, live channel; ARGV: entry id, envelope). Returns 1, or 0 when
that seq is already there (a retry): at-least-once delivery without duplicates. The wrapper
uses it for every event; the gateway only to close the stream of a container that died."""


class EventSource(StrEnum):
    """Who produced an event."""

    CLI = "cli"  # a stream-json line from the Claude Code CLI, unchanged in ``data``
    WRAPPER = "wrapper"  # a lifecycle event of the wrapper
    GATEWAY = "gateway"  # a notification from the gateway (child_* events), seq'd by the wrapper


def encode_envelope(
    *,
    seq: int,
    session_id: str,
    turn_id: str | None,
    event_type: str,
    data_json: str,
    source: EventSource,
    ts: float | None = None,
) -> str:
    """Build the envelope JSON ``{seq, session_id, turn_id, ts, type, source, data}``.

    ``data_json`` is embedded verbatim (for CLI events: the stream-json line exactly as the CLI
    printed it), so a 10 MB tool result is never parsed and re-serialised here. ``ts`` is Unix
    time in seconds (float) when the wrapper read the line.
    """
    return (
        f'{{"seq":{seq},"session_id":{json.dumps(session_id)},'
        f'"turn_id":{json.dumps(turn_id)},"ts":{ts if ts is not None else time.time():.6f},'
        f'"type":{json.dumps(event_type)},"source":"{source.value}","data":{data_json}}}'
    )


def decode_envelope(raw: str | bytes) -> dict[str, Any]:
    """Parse envelope JSON; raises ValueError when it is not an envelope."""
    obj = json.loads(raw)
    if not isinstance(obj, dict) or not isinstance(obj.get("seq"), int) or "type" not in obj:
        raise ValueError("not an event envelope")
    return obj


@dataclass(frozen=True)
class SessionSpec:
    """How the wrapper runs the CLI for one session (JSON at :func:`spec_key`).

    Every field maps to a Claude Code CLI flag (see ``wrapper.launch.build_cli_args``);
    ``timeout_seconds`` is the default per-turn deadline, enforced by the wrapper.
    """

    session_id: str
    model: str | None = None
    system_prompt: str | None = None
    append_system_prompt: str | None = None
    allowed_tools: list[str] = field(default_factory=list)
    disallowed_tools: list[str] = field(default_factory=list)
    permission_mode: str | None = None
    max_turns: int | None = None
    max_budget_usd: float | None = None
    json_schema: dict[str, Any] | None = None
    """Structured output (``--json-schema``): the CLI's result carries JSON conforming to it."""
    timeout_seconds: float | None = None
    mcp_servers: dict[str, Any] = field(default_factory=dict)
    include_partial_messages: bool = False
    gateway_url: str | None = None
    """When set, the CLI gets the ccgate MCP tools (spawn_session, ...) calling this gateway."""
    interrupt_grace_s: float = 10.0
    """After an interrupt (client or timeout), how long the CLI has to end the turn before
    the wrapper kills it (SIGTERM, 1 s, SIGKILL)."""
    resumed_at: float | None = None
    """Unix time when the gateway began resuming a paused session in this container; the
    ``ready`` event then reports ``resume_ms``."""
    cli_session_id: str | None = None
    """The CLI's own session id (``--session-id``/``--resume``), when it is not ``session_id``:
    a session that claimed a warm-pool container keeps the id its CLI was started with."""
    pooled: bool = False
    """A warm-pool spec: start the CLI, report on :func:`pool_ready_key`, then wait for a
    :class:`Claim` on :func:`claim_key` before serving any session."""

    def to_json(self) -> str:
        """Serialise for Redis."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> SessionSpec:
        """Parse from Redis; unknown keys (from a newer gateway) are ignored."""
        obj = json.loads(raw)
        known = {k: v for k, v in obj.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class Claim:
    """Binds a warm-pool container to its session (JSON pushed on :func:`claim_key`).

    The container was started under the id its session takes, so its Redis login, keys,
    volumes and labels are already the session's; ``spec`` is the session's SessionSpec JSON
    (its CLI flags equal the pool profile's; per-session settings such as turn timeouts come
    from it); ``claimed_at`` (Unix time) lets ``ready`` report ``claim_ms``."""

    session_id: str
    spec: str
    claimed_at: float

    def to_json(self) -> str:
        """Serialise for Redis."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Claim:
        """Parse from Redis; raises ValueError (or KeyError) on a malformed claim."""
        obj = json.loads(raw)
        return cls(
            session_id=str(obj["session_id"]),
            spec=str(obj["spec"]),
            claimed_at=float(obj["claimed_at"]),
        )


@dataclass(frozen=True)
class TurnRequest:
    """One prompt for the CLI (JSON in :func:`input_key`). ``message_id`` becomes the turn_id."""

    message_id: str
    prompt: str
    timeout_seconds: float | None = None

    def to_json(self) -> str:
        """Serialise for Redis."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> TurnRequest:
        """Parse from Redis."""
        obj = json.loads(raw)
        return cls(
            message_id=str(obj["message_id"]),
            prompt=str(obj["prompt"]),
            timeout_seconds=obj.get("timeout_seconds"),
        )


class ControlType(StrEnum):
    """Control messages the gateway sends to a running wrapper."""

    INTERRUPT = "interrupt"  # interrupt the running turn (CLI control-protocol interrupt)
    NOTIFY = "notify"  # publish a gateway event (one of CHILD_EVENTS) in this session's stream


@dataclass(frozen=True)
class ControlMessage:
    """A control message (JSON in :func:`control_key`); ``event``/``data`` only for NOTIFY."""

    type: ControlType
    event: str | None = None
    data: dict[str, Any] | None = None

    def to_json(self) -> str:
        """Serialise for Redis."""
        out: dict[str, Any] = {"type": self.type.value}
        if self.type is ControlType.NOTIFY:
            out.update(event=self.event, data=self.data or {})
        return json.dumps(out)

    @classmethod
    def from_json(cls, raw: str | bytes) -> ControlMessage:
        """Parse from Redis; raises ValueError on an unknown type or notification."""
        obj = json.loads(raw)
        kind = ControlType(obj["type"])
        if kind is ControlType.NOTIFY:
            event = str(obj.get("event"))
            if event not in GATEWAY_NOTICES:
                raise ValueError(f"unknown notification {event!r}")
            data = obj.get("data")
            return cls(type=kind, event=event, data=data if isinstance(data, dict) else {})
        return cls(type=kind)
