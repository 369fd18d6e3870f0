"""The scripted model picks replies from the turn's prompt and step."""

from __future__ import annotations

from typing import Any

from scripted_model import BRACES_TEXT, script_reply

TOOLS = [{"name": "Write"}]


def _body(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"model": "claude-sonnet-4-5", "tools": TOOLS, "messages": list(messages)}


def _user(text: str) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [
            {"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
            {"type": "text", "text": text},
        ],
    }


def test_write_then_finish() -> None:
    reply = script_reply(_body(_user("write out/a.txt hello")))
    tool = reply.blocks[1]
    assert reply.stop_reason == "tool_use"
    assert tool.name == "Write" and tool.input == {
        "file_path": "/workspace/out/a.txt",
        "content": "hello\n",
    }
    after = script_reply(
        _body(
            _user("write out/a.txt hello"),
            {"role": "assistant", "content": []},
            {"role": "user", "content": [{"type": "tool_result", "content": "ok"}]},
        )
    )
    assert after.stop_reason == "end_turn" and after.blocks[0].text == "Wrote out/a.txt."


def test_recall_quotes_the_first_prompt_and_side_requests_get_ok() -> None:
    body = _body(_user("first words"), {"role": "assistant", "content": []}, _user("recall"))
    assert script_reply(body).blocks[0].text == "You first said: first words"
    assert script_reply({"messages": [_user("title this")]}).blocks[0].text == "OK"


def test_failures_braces_and_echo() -> None:
    assert script_reply(_body(_user("fail 529"))).error_status == 529
    assert script_reply(_body(_user("braces"))).blocks[0].text == BRACES_TEXT
    assert script_reply(_body(_user("hello"))).blocks[0].text == "Echo: hello"
    assert script_reply(_body(_user("slow 2"))).slow_s == 2.0


def test_spawn_calls_the_ccgate_tools_then_quotes_the_child() -> None:
    first = script_reply(_body(_user("spawn clone echo hi")))
    assert first.blocks[0].name == "mcp__ccgate__spawn_session"
    assert first.blocks[0].input == {"prompt": "echo hi", "workspace": "clone"}

    def after(result: str, steps: int) -> Any:
        messages: list[dict[str, Any]] = [_user("spawn echo hi")]
        for _ in range(steps):
            messages += [
                {"role": "assistant", "content": []},
                {"role": "user", "content": [{"type": "tool_result", "content": result}]},
            ]
        return script_reply(_body(*messages))

    waiting = after('{"child_session_id": "c-1"}', 1)
    assert waiting.blocks[0].name == "mcp__ccgate__wait_for_result"
    assert waiting.blocks[0].input["session_id"] == "c-1"
    refused = after("spawn refused: max_spawn_depth is 2 (HTTP 409)", 1)
    assert refused.blocks[0].text.startswith("Spawn failed: spawn refused")
    done = after('{"result": "Echo: hi"}', 2)
    assert done.blocks[0].text == "Child said: Echo: hi"
