"""The early launch (the CLI started from the spec in the environment before the wrapper's
imports) and CliProcess driving a process it adopted, with real child processes."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from wrapper.cli_process import CliProcess
from wrapper.launch import (
    MARKER_FILE,
    SPEC_ENV,
    cli_environment,
    launch_early,
    popen_cli,
    session_cli_args,
)
from wrapper.protocol import SessionSpec


@pytest.fixture
def fake_claude(tmp_path: Path) -> str:
    """A stand-in CLI: prints its argv as one JSON line, then echoes stdin lines."""
    path = tmp_path / "claude"
    path.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "print(json.dumps(sys.argv[1:]), flush=True)\n"
        "for line in sys.stdin:\n"
        "    print(line.strip(), flush=True)\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _launch(environ: dict[str, str], claude: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    return launch_early(
        environ,
        claude_bin=claude,
        workspace=str(tmp_path),
        marker_dir=str(tmp_path / "marker"),
        uid=None,
        home=str(tmp_path),
    )


def test_no_early_launch_without_a_usable_spec(fake_claude: str, tmp_path: Path) -> None:
    spec = SessionSpec(session_id="s-1")
    pooled = SessionSpec(session_id="s-1", pooled=True)
    for environ in (
        {"CCGATE_SESSION_ID": "s-1"},
        {"CCGATE_SESSION_ID": "s-1", SPEC_ENV: "{not json"},
        {"CCGATE_SESSION_ID": "s-1", SPEC_ENV: pooled.to_json()},
        {"CCGATE_SESSION_ID": "other", SPEC_ENV: spec.to_json()},
    ):
        assert _launch(environ, fake_claude, tmp_path) is None
    missing = {"CCGATE_SESSION_ID": "s-1", SPEC_ENV: spec.to_json()}
    assert _launch(missing, str(tmp_path / "no-such-claude"), tmp_path) is None


async def test_the_early_cli_gets_the_sessions_flags_and_is_adopted(
    fake_claude: str, tmp_path: Path
) -> None:
    spec = SessionSpec(session_id="s-1", model="m", gateway_url="http://gw")
    early = _launch({"CCGATE_SESSION_ID": "s-1", SPEC_ENV: spec.to_json()}, fake_claude, tmp_path)
    assert early is not None
    assert early.args == session_cli_args(spec, claude_bin=fake_claude, resume=False)
    cli = await CliProcess.adopt(early.process)
    lines = cli.lines()
    argv = json.loads(await anext(lines))
    assert "--session-id=s-1" in argv and "--model=m" in argv
    assert any('"type": "sdk"' in a for a in argv if a.startswith("--mcp-config="))
    await cli.write(b'{"hello": 1}\n')
    assert json.loads(await anext(lines)) == {"hello": 1}
    assert cli.returncode is None
    assert await cli.stop(2.0) == 0  # EOF on stdin ends the stand-in
    assert cli.returncode == 0


async def test_a_transcript_marker_makes_the_early_cli_resume(
    fake_claude: str, tmp_path: Path
) -> None:
    (tmp_path / "marker").mkdir()
    marker = {"transcript": True, "cli_session_id": "slot-7"}
    (tmp_path / "marker" / MARKER_FILE).write_text(json.dumps(marker))
    spec = SessionSpec(session_id="s-1")
    early = _launch({"CCGATE_SESSION_ID": "s-1", SPEC_ENV: spec.to_json()}, fake_claude, tmp_path)
    assert early is not None
    assert "--resume=slot-7" in early.args and early.spec.cli_session_id == "slot-7"
    early.process.kill()
    early.process.wait()


async def test_a_killed_cli_reports_the_signal_and_writes_fail_as_connection_errors(
    tmp_path: Path,
) -> None:
    cli = await CliProcess.spawn(["sleep", "30"], cwd=str(tmp_path))
    os.kill(cli.pid, 9)
    assert await asyncio.wait_for(cli.wait(), 5) == -9
    with pytest.raises(ConnectionError):
        for _ in range(100):  # the pipe's buffer may take a few writes before it breaks
            await cli.write(b"x" * 65536)


def test_the_cli_never_sees_the_wrappers_spec_or_redis_login() -> None:
    env = cli_environment({SPEC_ENV: "{}", "CCGATE_REDIS_URL": "redis://u:p@h", "PATH": "/bin"})
    assert env == {"PATH": "/bin"}
    proc = popen_cli(["true"], cwd="/", uid=None, home="/")
    assert proc.wait(5) == 0
