"""The envelope checks applied to everything read from a session's stream (pure)."""

from __future__ import annotations

from typing import Any

from gateway.services.envelopes import envelope_problem, notice_key, sign_notice

KEY = notice_key("secret")
SID = "11111111-1111-1111-1111-111111111111"


def _env(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "seq": 1,
        "session_id": SID,
        "turn_id": None,
        "ts": 1.0,
        "type": "assistant",
        "source": "cli",
        "data": {"type": "assistant"},
    }
    return base | fields


def test_genuine_envelopes_pass() -> None:
    assert envelope_problem(SID, _env(), KEY) is None
    assert envelope_problem(SID, _env(type="turn_completed", source="wrapper"), KEY) is None
    signed = sign_notice(KEY, SID, "child_result", {"child_session_id": "c", "n": 1.5})
    assert (
        envelope_problem(SID, _env(type="child_result", source="gateway", data=signed), KEY) is None
    )


def test_the_signature_binds_session_type_and_data() -> None:
    signed = sign_notice(KEY, SID, "child_result", {"child_session_id": "c"})
    cases = [
        _env(type="child_failed", source="gateway", data=signed),  # other type
        _env(type="child_result", source="gateway", data=signed | {"child_session_id": "d"}),
        _env(type="child_result", source="gateway", data={"child_session_id": "c"}),  # unsigned
    ]
    for envelope in cases:
        assert "signature" in (envelope_problem(SID, envelope, KEY) or "")
    other_sid = "22222222-2222-2222-2222-222222222222"
    moved = _env(session_id=other_sid, type="child_result", source="gateway", data=signed)
    assert "signature" in (envelope_problem(other_sid, moved, KEY) or "")
    wrong_key = sign_notice(notice_key("guess"), SID, "child_result", {"child_session_id": "c"})
    guessed = _env(type="child_result", source="gateway", data=wrong_key)
    assert "signature" in (envelope_problem(SID, guessed, KEY) or "")


def test_shape_source_and_type_rules() -> None:
    problems = {
        "another session": envelope_problem(SID, _env(session_id="x"), KEY),
        "source": envelope_problem(SID, _env(source="root"), KEY),
        "turn_id": envelope_problem(SID, _env(turn_id="t" * 37), KEY),
        "data": envelope_problem(SID, _env(data=[1]), KEY),
        "long type": envelope_problem(SID, _env(type="t" * 65), KEY),
        "wrapper type": envelope_problem(SID, _env(source="wrapper", type="child_result"), KEY),
        "cli as lifecycle": envelope_problem(SID, _env(type="turn_completed"), KEY),
        "gateway type": envelope_problem(SID, _env(source="gateway", type="ready"), KEY),
    }
    assert all(problem is not None for problem in problems.values()), problems
    assert problems["another session"].startswith("forged")  # type: ignore[union-attr]


def test_the_gateway_may_close_a_dead_containers_stream_only_with_its_signature() -> None:
    data = {"reason": "crashed", "cause": "killed", "exit_code": 137, "cli_exit_code": None}
    signed = sign_notice(KEY, SID, "exited", data)
    assert envelope_problem(SID, _env(type="exited", source="gateway", data=signed), KEY) is None
    forged = _env(type="exited", source="gateway", data=data)
    assert "signature" in str(envelope_problem(SID, forged, KEY))
    oom = sign_notice(KEY, SID, "container_oom", {"message": "out of memory"})
    assert (
        envelope_problem(SID, _env(type="container_oom", source="gateway", data=oom), KEY) is None
    )
    # The wrapper may not claim the gateway's notice, nor the CLI a ccgate type.
    assert "not a wrapper event" in str(
        envelope_problem(SID, _env(type="container_oom", source="wrapper", data={}), KEY)
    )
    assert "forged" in str(envelope_problem(SID, _env(type="container_oom", data={}), KEY))
