"""stream-json framing: newlines only, no cap, braces and quotes are just text."""

from __future__ import annotations

import json

from wrapper.ndjson import LineSplitter


def _split(chunks: list[bytes]) -> list[bytes]:
    splitter = LineSplitter()
    out: list[bytes] = []
    for chunk in chunks:
        out.extend(splitter.feed(chunk))
    rest = splitter.flush()
    if rest is not None:
        out.append(rest)
    return out


def test_braces_and_quotes_inside_strings_do_not_split_or_drop_lines() -> None:
    first = json.dumps({"type": "assistant", "text": 'a } and { and "}" and \\" }}}'})
    second = json.dumps({"type": "result", "result": "{{{"})
    lines = _split([(first + "\n" + second + "\n").encode()])
    assert [json.loads(x) for x in lines] == [json.loads(first), json.loads(second)]


def test_lines_split_across_partial_reads_are_reassembled() -> None:
    payload = (json.dumps({"n": 1}) + "\n" + json.dumps({"n": 2, "s": "é"}) + "\n").encode()
    for cut in range(1, len(payload)):
        assert [json.loads(x) for x in _split([payload[:cut], payload[cut:]])] == [
            {"n": 1},
            {"n": 2, "s": "é"},
        ]


def test_one_byte_at_a_time() -> None:
    payload = b'{"a": "x\\ny"}\n{"b": 2}\n'
    assert _split([payload[i : i + 1] for i in range(len(payload))]) == [
        b'{"a": "x\\ny"}',
        b'{"b": 2}',
    ]


def test_a_line_over_one_mebibyte_arrives_whole() -> None:
    big = json.dumps({"type": "user", "content": "x" * (3 * 1024 * 1024)})
    chunks = [big.encode()[i : i + 65536] for i in range(0, len(big), 65536)] + [b"\n{}\n"]
    lines = _split(chunks)
    assert len(lines) == 2
    assert len(lines[0]) == len(big.encode())
    assert json.loads(lines[0])["content"] == "x" * (3 * 1024 * 1024)


def test_crlf_and_blank_lines_and_unterminated_tail() -> None:
    assert _split([b'{"a":1}\r\n\r\n\n{"b":2}']) == [b'{"a":1}', b'{"b":2}']
