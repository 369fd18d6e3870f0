"""What an envelope read from a session's stream must be before it is persisted or applied.

Everything in a session's stream came out of its container, so it is checked here against the
envelope schema (wrapper/protocol.py: ``{seq, session_id, turn_id, ts, type, source, data}``):

- ``session_id`` is the stream's own session (an envelope naming another session is refused);
- ``source`` is ``cli``, ``wrapper`` or ``gateway``; ``type`` a string of at most 64 characters;
  ``turn_id`` null or a string of at most 36; ``data`` a JSON object;
- a ``wrapper`` envelope has one of the wrapper's own types (the lifecycle the ledger applies);
  a ``cli`` envelope does not use a wrapper or gateway type;
- a ``gateway`` envelope carries the gateway's HMAC-SHA256 signature in ``data.ccgate_sig``
  over its session, type and data: ``child_*`` and ``container_oom`` (the gateway's notices,
  relayed by the wrapper),
  or ``turn_completed``/``exited`` written by the gateway itself to close the stream of a
  container that died. A container cannot make one: the key is derived from the gateway's
  secret.

An envelope that fails is not persisted and not applied; the reader dead-letters it with the
reason. Cost and budgets never come from envelopes at all (the model proxy meters them).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from wrapper.protocol import GATEWAY_NOTICES, EventSource, EventType

SIGNATURE_FIELD = "ccgate_sig"
WRAPPER_TYPES = frozenset(t.value for t in EventType) - frozenset(GATEWAY_NOTICES)
GATEWAY_TYPES = frozenset(t.value for t in GATEWAY_NOTICES) | {
    EventType.TURN_COMPLETED.value,
    EventType.EXITED.value,
}
SOURCES = frozenset(s.value for s in EventSource)


def notice_key(secret: str) -> bytes:
    """The key gateway notices are signed with (derived from the gateway's JWT secret)."""
    return hmac.new(secret.encode(), b"ccgate-notice-v1", hashlib.sha256).digest()


def _signed_text(session_id: str, event: str, data: dict[str, Any]) -> bytes:
    body = {k: v for k, v in data.items() if k != SIGNATURE_FIELD}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"{session_id}\n{event}\n{canonical}".encode()


def sign_notice(key: bytes, session_id: str, event: str, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its signature added (what the gateway sends a wrapper to relay)."""
    signature = hmac.new(key, _signed_text(session_id, event, data), hashlib.sha256).hexdigest()
    return {**data, SIGNATURE_FIELD: signature}


def envelope_problem(session_id: str, envelope: dict[str, Any], key: bytes | None) -> str | None:
    """Why ``envelope`` (already known to be an object with a seq and a type) must be refused,
    or None. ``key`` is the notice key; None skips the signature check (tools, tests)."""
    kind = envelope["type"]
    if envelope.get("session_id") != session_id:
        return f"forged: the envelope names session {str(envelope.get('session_id'))[:40]!r}"
    source = envelope.get("source")
    if source not in SOURCES:
        return f"invalid: unknown source {str(source)[:20]!r}"
    if len(kind) > 64:
        return "invalid: type longer than 64 characters"
    turn_id = envelope.get("turn_id")
    if turn_id is not None and (not isinstance(turn_id, str) or len(turn_id) > 36):
        return "invalid: turn_id is not null or a string of at most 36 characters"
    data = envelope.get("data")
    if not isinstance(data, dict):
        return "invalid: data is not a JSON object"
    if source == EventSource.WRAPPER and kind not in WRAPPER_TYPES:
        return f"forged: {kind!r} is not a wrapper event"
    if source == EventSource.CLI and kind in WRAPPER_TYPES | GATEWAY_TYPES:
        return f"forged: a CLI line typed as ccgate's own {kind!r}"
    if source == EventSource.GATEWAY:
        if kind not in GATEWAY_TYPES:
            return f"forged: {kind!r} is not a gateway event"
        if key is not None:
            given = data.get(SIGNATURE_FIELD)
            expected = hmac.new(key, _signed_text(session_id, kind, data), hashlib.sha256)
            if not isinstance(given, str) or not hmac.compare_digest(given, expected.hexdigest()):
                return "forged: a gateway event without the gateway's signature"
    return None
