"""How a dead container's stream is closed, and how Docker's events are read (pure)."""

from __future__ import annotations

from typing import Any

from gateway.services.container_deaths import closing_events, death_cause
from gateway.services.creation import _lifetime
from gateway.services.runtime.docker import bridge_gateway
from gateway.services.runtime.docker_events import death_of
from wrapper.protocol import TurnOutcome

TURN = "22222222-2222-2222-2222-222222222222"


def test_the_cause_is_oom_then_sigkill_then_exited() -> None:
    assert death_cause(137, oom_killed=True) is TurnOutcome.OOM
    assert death_cause(137, oom_killed=False) is TurnOutcome.KILLED
    assert death_cause(0, oom_killed=False) is TurnOutcome.EXITED
    assert death_cause(None, oom_killed=False) is TurnOutcome.EXITED


def _newest(kind: str, turn_id: str | None) -> dict[str, Any]:
    return {"seq": 9, "type": kind, "turn_id": turn_id, "source": "cli", "data": {}}


def test_an_open_turn_is_completed_then_the_stream_exits() -> None:
    events = closing_events(_newest("stream_event", TURN), TurnOutcome.KILLED, 137)
    assert [(kind, turn) for kind, turn, _ in events] == [
        ("turn_completed", TURN),
        ("exited", None),
    ]
    completed = events[0][2]
    assert completed["message_id"] == TURN and completed["is_error"] is True
    assert completed["subtype"] == "error_killed" and completed["outcome"] == "killed"
    assert completed["terminal_reason"] == "container_killed"
    assert "killed (SIGKILL)" in completed["errors"][0]
    assert events[1][2] == {
        "reason": "crashed",
        "cause": "killed",
        "exit_code": 137,
        "cli_exit_code": None,
    }


def test_between_turns_only_exited_is_written() -> None:
    for newest in (_newest("ready", None), _newest("turn_completed", TURN), None):
        events = closing_events(newest, TurnOutcome.OOM, 137)
        assert [kind for kind, _, _ in events] == ["exited"], newest
        assert events[0][2]["cause"] == "oom"


def test_a_stream_that_already_ended_is_left_alone() -> None:
    assert closing_events(_newest("exited", None), TurnOutcome.EXITED, 0) == []


def test_docker_die_and_oom_events_are_read_and_others_ignored() -> None:
    die = {
        "Type": "container",
        "Action": "die",
        "Actor": {"ID": "abc", "Attributes": {"exitCode": "137", "ccgate.session_id": "s1"}},
        "time": 1700000000,
        "timeNano": 1700000000123456789,
    }
    death = death_of(die)
    assert death is not None and death.action == "die" and death.container_id == "abc"
    assert death.exit_code == 137 and death.labels == {"ccgate.session_id": "s1"}
    assert abs(death.at - 1700000000.123456789) < 1e-6
    oom = death_of({**die, "Action": "oom", "Actor": {"ID": "abc", "Attributes": {}}})
    assert oom is not None and oom.action == "oom" and oom.exit_code is None
    assert death_of({**die, "Action": "start"}) is None
    assert death_of({**die, "Type": "network"}) is None


def test_the_bridge_gateway_falls_back_to_the_subnets_first_address() -> None:
    assert bridge_gateway({"Subnet": "172.18.0.0/16", "Gateway": "172.18.0.1"}) == "172.18.0.1"
    assert bridge_gateway({"Subnet": "172.17.0.0/16"}) == "172.17.0.1"
    assert bridge_gateway({"Subnet": "fd00::/64", "Gateway": "fd00::1"}) is None
    assert bridge_gateway({}) is None


def test_a_sessions_lifetime_never_passes_the_deployments() -> None:
    assert _lifetime(None, 86_400) == 86_400
    assert _lifetime(60, 86_400) == 60
    assert _lifetime(10**6, 86_400) == 86_400
    assert _lifetime(60, 0) == 60  # the deployment sets no limit
    assert _lifetime(None, 0) == 0


def test_the_admission_queue_is_fair_across_users() -> None:
    from gateway.services.admission import fair_order

    waiting = [("alice", "a1"), ("alice", "a2"), ("alice", "a3"), ("bob", "b1"), ("carol", "c1")]
    assert fair_order(waiting) == ["a1", "b1", "c1", "a2", "a3"]
    assert fair_order([]) == []


def test_available_memory_is_read_from_meminfo(tmp_path: Any) -> None:
    from gateway.services.admission import available_memory_mib

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 25165824 kB\nMemAvailable: 2097152 kB\n")
    assert available_memory_mib(str(meminfo)) == 2048
    assert available_memory_mib(str(tmp_path / "missing")) is None
