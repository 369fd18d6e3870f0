"""The event envelope and the Redis key layout."""

from __future__ import annotations

import json

import pytest

from gateway.services.events import envelope_seq
from wrapper.protocol import (
    ControlMessage,
    ControlType,
    EventSource,
    SessionSpec,
    TurnRequest,
    decode_envelope,
    encode_envelope,
    events_key,
    live_channel,
    seq_of_stream_id,
    session_prefix,
    stream_id,
)


def test_envelope_carries_cli_json_verbatim_with_seq_first() -> None:
    line = (
        '{"type":"assistant","message":{"content":[{"type":"text","text":"{\\"x\\": \\"}\\"}"}]}}'
    )
    raw = encode_envelope(
        seq=42,
        session_id="s-1",
        turn_id="m-1",
        event_type="assistant",
        data_json=line,
        source=EventSource.CLI,
        ts=1700000000.5,
    )
    obj = decode_envelope(raw)
    assert obj == {
        "seq": 42,
        "session_id": "s-1",
        "turn_id": "m-1",
        "ts": 1700000000.5,
        "type": "assistant",
        "source": "cli",
        "data": json.loads(line),
    }
    assert raw.endswith(line + "}")
    assert envelope_seq(raw.encode()) == 42


def test_envelope_without_turn_is_null_and_strings_are_escaped() -> None:
    raw = encode_envelope(
        seq=1,
        session_id='we"ird',
        turn_id=None,
        event_type="ready",
        data_json="{}",
        source=EventSource.WRAPPER,
    )
    obj = decode_envelope(raw)
    assert obj["turn_id"] is None and obj["session_id"] == 'we"ird'


def test_decode_refuses_non_envelopes() -> None:
    with pytest.raises(ValueError):
        decode_envelope('{"type":"x"}')
    with pytest.raises(ValueError):
        envelope_seq(b'{"type":"gap"}')


def test_stream_ids_are_seq_based() -> None:
    assert stream_id(7) == "7-0"
    assert seq_of_stream_id(b"7-0") == 7 and seq_of_stream_id("123-0") == 123


def test_every_key_of_a_session_shares_its_prefix() -> None:
    prefix = session_prefix("abc")
    assert events_key("abc").startswith(prefix) and live_channel("abc").startswith(prefix)


def test_spec_turn_and_control_round_trip() -> None:
    spec = SessionSpec(session_id="s", model="m", allowed_tools=["Read"], max_turns=3)
    assert SessionSpec.from_json(spec.to_json()) == spec
    newer = json.loads(spec.to_json()) | {"field_from_the_future": 1}
    assert SessionSpec.from_json(json.dumps(newer)) == spec
    turn = TurnRequest(message_id="m", prompt="p", timeout_seconds=5)
    assert TurnRequest.from_json(turn.to_json()) == turn
    assert ControlMessage.from_json('{"type":"interrupt"}').type is ControlType.INTERRUPT
    with pytest.raises(ValueError):
        ControlMessage.from_json('{"type":"reboot"}')


def test_notifications_carry_only_child_events() -> None:
    message = ControlMessage(
        type=ControlType.NOTIFY, event="child_result", data={"child_session_id": "c"}
    )
    assert ControlMessage.from_json(message.to_json()) == message
    with pytest.raises(ValueError, match="unknown notification"):
        ControlMessage.from_json('{"type":"notify","event":"exited","data":{}}')


def test_a_turns_outcome_names_how_it_ended() -> None:
    from wrapper.protocol import TurnOutcome
    from wrapper.turns import turn_outcome

    ok = {"subtype": "success", "is_error": False, "terminal_reason": "completed"}
    assert turn_outcome(ok, None) is TurnOutcome.COMPLETED
    assert turn_outcome({"is_error": True, "terminal_reason": "max_turns"}, None) is (
        TurnOutcome.ERROR
    )
    aborted = {"is_error": True, "terminal_reason": "aborted_streaming"}
    assert turn_outcome(aborted, None) is TurnOutcome.INTERRUPTED
    assert turn_outcome(aborted, TurnOutcome.TIMEOUT) is TurnOutcome.TIMEOUT
    assert turn_outcome({"terminal_reason": "turn_timeout"}, None) is TurnOutcome.TIMEOUT
    assert turn_outcome({"terminal_reason": "interrupt_ignored"}, None) is TurnOutcome.KILLED
    assert turn_outcome({"terminal_reason": "stopped"}, None) is TurnOutcome.KILLED
    assert turn_outcome({"terminal_reason": "cli_exited"}, None) is TurnOutcome.EXITED
