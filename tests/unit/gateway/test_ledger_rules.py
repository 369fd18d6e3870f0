"""How turn results become turn status and session totals."""

from __future__ import annotations

from gateway.db.models import TurnStatus
from gateway.services.ledger import turn_status_of


def test_interrupts_are_recognised_by_terminal_reason_not_is_error() -> None:
    old_cli = {
        "subtype": "error_during_execution",
        "is_error": False,
        "terminal_reason": "aborted_streaming",
    }
    assert turn_status_of(old_cli) is TurnStatus.INTERRUPTED
    assert (
        turn_status_of({"is_error": True, "terminal_reason": "aborted_tools"})
        is TurnStatus.INTERRUPTED
    )
    assert turn_status_of({"is_error": True, "terminal_reason": "api_error"}) is TurnStatus.FAILED
    assert (
        turn_status_of({"is_error": False, "terminal_reason": "completed"}) is TurnStatus.COMPLETED
    )
