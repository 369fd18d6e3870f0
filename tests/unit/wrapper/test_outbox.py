"""The wrapper's on-disk outbox."""

from __future__ import annotations

from pathlib import Path

from wrapper.outbox import Outbox
from wrapper.protocol import EventSource, encode_envelope


def _env(seq: int) -> str:
    return encode_envelope(
        seq=seq, session_id="s", turn_id=None, event_type="x", data_json="{}",
        source=EventSource.CLI, ts=1.0,
    )  # fmt: skip


def test_a_restart_recovers_what_was_journaled_but_not_delivered(tmp_path: Path) -> None:
    box = Outbox(str(tmp_path))
    assert box.recover() == (0, [])
    for seq in range(1, 6):
        box.append(seq, _env(seq))
    box.delivered(2)
    box.close()
    with open(tmp_path / "outbox.jsonl", "ab") as fh:
        fh.write(b'{"seq":6,"sess')  # torn by a crash mid-append
    last, pending = Outbox(str(tmp_path)).recover()
    assert last == 5
    assert [seq for seq, _ in pending] == [3, 4, 5]
    assert pending[0][1] == _env(3)


def test_the_journal_is_compacted_once_everything_is_delivered(tmp_path: Path) -> None:
    box = Outbox(str(tmp_path), compact_bytes=200)
    for seq in range(1, 10):
        box.append(seq, _env(seq))
    box.delivered(5)
    assert (tmp_path / "outbox.jsonl").stat().st_size > 200  # undelivered events stay
    box.delivered(9)
    assert (tmp_path / "outbox.jsonl").stat().st_size == 0
    box.append(10, _env(10))
    box.close()
    assert Outbox(str(tmp_path)).recover() == (10, [(10, _env(10))])
