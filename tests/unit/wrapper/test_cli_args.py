"""The CLI command line built from a session spec."""

from __future__ import annotations

import json

from wrapper.cli_process import user_message_line
from wrapper.launch import build_cli_args, cli_environment
from wrapper.protocol import SessionSpec


def test_stream_json_needs_verbose_and_pins_the_session_id() -> None:
    args = build_cli_args(SessionSpec(session_id="u-1"), claude_bin="claude", resume=False)
    assert args[:4] == [
        "claude",
        "--input-format=stream-json",
        "--output-format=stream-json",
        "--verbose",
    ]
    assert "--session-id=u-1" in args and not any(a.startswith("--resume") for a in args)


def test_every_option_reaches_the_cli_and_restart_resumes() -> None:
    spec = SessionSpec(
        session_id="u-2",
        model="claude-sonnet-4-5",
        system_prompt="-starts with a dash",
        append_system_prompt="be brief",
        allowed_tools=["Read", "Bash(git *)"],
        disallowed_tools=["WebFetch"],
        permission_mode="acceptEdits",
        max_turns=4,
        max_budget_usd=1.5,
        mcp_servers={"x": {"command": "x-server"}},
        include_partial_messages=True,
    )
    args = build_cli_args(spec, claude_bin="/usr/bin/claude", resume=True)
    assert "--resume=u-2" in args
    assert "--model=claude-sonnet-4-5" in args
    assert "--system-prompt=-starts with a dash" in args
    assert "--append-system-prompt=be brief" in args
    assert "--allowedTools=Read,Bash(git *)" in args
    assert "--disallowedTools=WebFetch" in args
    assert "--permission-mode=acceptEdits" in args
    assert "--max-turns=4" in args and "--max-budget-usd=1.5" in args
    assert "--include-partial-messages" in args
    mcp = next(a for a in args if a.startswith("--mcp-config="))
    assert json.loads(mcp.split("=", 1)[1]) == {"mcpServers": {"x": {"command": "x-server"}}}


def test_user_line_is_one_stream_json_message() -> None:
    line = user_message_line('multi\nline "quoted"')
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line)["message"] == {"role": "user", "content": 'multi\nline "quoted"'}


def test_cli_environment_drops_claudecode_and_the_redis_credentials() -> None:
    env = cli_environment({"CLAUDECODE": "1", "CCGATE_REDIS_URL": "redis://u:p@h", "KEEP": "x"})
    assert env == {"KEEP": "x"}


def test_the_ccgate_tools_join_the_sessions_own_mcp_servers() -> None:
    from wrapper.mcp_tools import SDK_SERVER_CONFIG

    spec = SessionSpec(session_id="u-3", mcp_servers={"mine": {"command": "x"}})
    args = build_cli_args(
        spec, claude_bin="claude", resume=False, extra_mcp_servers={"ccgate": SDK_SERVER_CONFIG}
    )
    mcp = json.loads(next(a for a in args if a.startswith("--mcp-config=")).split("=", 1)[1])
    assert set(mcp["mcpServers"]) == {"mine", "ccgate"}
    # Served in-process over the control protocol: no command, no secret on the command line.
    assert mcp["mcpServers"]["ccgate"] == {"type": "sdk", "name": "ccgate"}


def test_a_claimed_session_keeps_the_cli_session_id_of_its_pool_container() -> None:
    spec = SessionSpec(session_id="sess-1", cli_session_id="slot-9")
    assert "--session-id=slot-9" in build_cli_args(spec, claude_bin="claude", resume=False)
    assert "--resume=slot-9" in build_cli_args(spec, claude_bin="claude", resume=True)
    plain = SessionSpec(session_id="sess-1")
    assert "--session-id=sess-1" in build_cli_args(plain, claude_bin="claude", resume=False)
