"""What a job's run produced, as the job's columns: the turn's result, cost and usage, and its
structured output checked against the job's JSON Schema; and the prompt with its ``{{name}}``
placeholders replaced (pure; unit-tested)."""

from __future__ import annotations

import json
from typing import Any

from jsonschema import Draft202012Validator

from gateway.db.models import JobStatus, Turn, TurnStatus
from gateway.services.job_workspace import UPLOADS_IN_WORKSPACE


class JobEnded(Exception):
    """The job ends here with these column values (status, error…)."""

    def __init__(self, **values: Any) -> None:
        super().__init__(values.get("error"))
        self.values = values


def substitute(prompt: str, names: list[str]) -> str:
    """``{{name}}`` of each uploaded file → its absolute path in the workspace; other
    placeholders are left as they are."""
    for name in names:
        prompt = prompt.replace("{{" + name + "}}", f"/workspace/{UPLOADS_IN_WORKSPACE}/{name}")
    return prompt


def costs(turn: Turn | None) -> dict[str, Any]:
    """The job's cost (USD, metered by the model proxy), usage, turns and duration."""
    if turn is None:
        return {}
    cost = turn.cost_usd if turn.cost_usd is not None else turn.total_cost_usd
    return {
        "cost_usd": cost,
        "usage": turn.usage,
        "num_turns": turn.num_turns,
        "duration_ms": turn.duration_ms,
    }


def outcome(turn: Turn, schema: dict[str, Any] | None) -> dict[str, Any]:
    """completed with the result (and the structured output, checked against ``schema``), or
    failed with why."""
    if turn.status is not TurnStatus.COMPLETED or turn.is_error:
        why = "; ".join(turn.errors or []) or turn.subtype or turn.outcome or turn.status.value
        return {
            "status": JobStatus.FAILED,
            "result": turn.result,
            "error": f"the run failed: {why}",
        }
    if schema is None:
        return {"status": JobStatus.COMPLETED, "result": turn.result}
    if turn.structured_output is not None:
        return validate_structured(turn.result, schema, data=turn.structured_output)
    return validate_structured(turn.result, schema)


_NO_DATA = object()


def validate_structured(
    result: str | None, schema: dict[str, Any], *, data: Any = _NO_DATA
) -> dict[str, Any]:
    """The job's columns for a structured result: ``data`` (the CLI's ``structured_output``;
    by default the result text parsed as JSON) must conform to ``schema`` — completed with
    ``structured_output``, or failed naming the first violation and where it is. The CLI
    checks it too, but it runs in the container: the gateway checks again."""
    if data is _NO_DATA:
        try:
            data = json.loads(result or "")
        except ValueError:
            return {
                "status": JobStatus.FAILED,
                "result": result,
                "error": "the result is not JSON, so it cannot conform to json_schema",
            }
    errors = sorted(Draft202012Validator(schema).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(root)"
        return {
            "status": JobStatus.FAILED,
            "result": result,
            "structured_output": data,
            "error": f"the result does not conform to json_schema at {where}: {first.message}",
        }
    return {"status": JobStatus.COMPLETED, "result": result, "structured_output": data}
