"""How turn results become turn status and session totals."""

from __future__ import annotations

from gateway.db.models import TurnStatus
from gateway.services.ledger import add_usage, turn_status_of


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


def test_usage_is_summed_per_counter() -> None:
    total = add_usage({}, {"input_tokens": 10, "output_tokens": 2, "service_tier": "standard"})
    total = add_usage(total, {"input_tokens": 5, "cache_read_input_tokens": 7})
    assert total == {"input_tokens": 15, "output_tokens": 2, "cache_read_input_tokens": 7}
    assert add_usage(total, None) == total
