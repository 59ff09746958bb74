"""Append-only JSON Lines cut by a stop: what is read back, and what cutting the damaged end keeps."""

from __future__ import annotations

import json

from hypothesis import given, settings, strategies as st

from crma_jax.train.jsonl import cut_damaged_end, read_lines


def _parse(line: bytes) -> int | None:
    try:
        return json.loads(line)["n"]
    except (ValueError, KeyError, TypeError):
        return None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 10**6), max_size=6), st.data())
def test_a_stop_anywhere_in_the_last_write_keeps_every_whole_record(tmp_path_factory, numbers, data):
    path = tmp_path_factory.mktemp("jsonl") / "log.jsonl"
    whole = b"".join(json.dumps({"n": n}).encode() + b"\n" for n in numbers)
    last = json.dumps({"n": -1}).encode() + b"\n"
    stop = data.draw(st.integers(0, len(last) - 1), label="bytes of the last record written")
    path.write_bytes(whole + last[:stop])
    lines = read_lines(path, _parse)
    assert lines.records == numbers and lines.unreadable == []
    assert lines.cut == (len(numbers) + 1 if stop else None) and lines.tail == last[:stop]
    assert cut_damaged_end(path, lines) == stop
    assert path.read_bytes() == whole  # what was kept is not rewritten, and ends with its newline
    with open(path, "ab") as f:
        f.write(last)
    assert read_lines(path, _parse).records == [*numbers, -1]


def test_damaged_lines_are_named_and_only_the_end_is_cut(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"n": 1}\n\x00\x00garbage\n\n{"n": 2}\n{"n": 3, "x": [\n{"oth')
    lines = read_lines(path, _parse)
    assert lines.records == [1, 2] and lines.unreadable == [2, 5] and lines.cut == 6
    assert cut_damaged_end(path, lines) == len(b'{"n": 3, "x": [\n{"oth')
    assert path.read_bytes() == b'{"n": 1}\n\x00\x00garbage\n\n{"n": 2}\n'  # damage in the middle is left
    assert cut_damaged_end(path, read_lines(path, _parse)) == 0


def test_blank_lines_after_a_record_stay_and_a_last_line_without_its_newline_is_no_record(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"n": 1}\n\n\n')
    lines = read_lines(path, _parse)
    assert lines.records == [1] and cut_damaged_end(path, lines) == 0 and path.read_bytes() == b'{"n": 1}\n\n\n'
    path.write_bytes(b'{"n": 1}\n{"n": 2}')  # the stop came between the record and its newline
    lines = read_lines(path, _parse)
    assert lines.records == [1] and lines.cut == 2 and lines.tail == b'{"n": 2}'
