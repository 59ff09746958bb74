"""Append-only JSON Lines files that a stop may cut: RUN/metrics.jsonl and `crma bench memory
--append`'s grid. A record is written as one line with its newline, so a stop (a kill, a full
disk) can leave at most a damaged end; reading back keeps every line before it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, TypeVar

R = TypeVar("R")


@dataclass(frozen=True)
class Lines(Generic[R]):
    """What `read_lines` found: the records in file order; the 1-based numbers of the complete
    lines that do not parse; `cut`, the number of a last line without its newline (a record cut as
    it was written, never a record), or None, and `tail`, that line's bytes; and `end`, the byte
    offset just past the last record and the blank lines after it (what follows is the damaged
    end: `end == size` when there is none)."""

    records: list[R]
    unreadable: list[int]
    cut: int | None
    tail: bytes
    end: int
    size: int


def read_lines(path: Path, parse: Callable[[bytes], R | None]) -> Lines[R]:
    """Every line of `path` through `parse` (None: not a record); blank lines are skipped."""
    data = path.read_bytes()
    records: list[R] = []
    unreadable: list[int] = []
    end = offset = 0
    cut, clean = None, True
    for number, line in enumerate(data.split(b"\n"), 1):
        offset += len(line) + 1
        if offset > len(data):  # the text after the last newline: empty, or a line cut short
            cut = number if line else None
            break
        if not line.strip():
            end = offset if clean else end  # blank lines after a record stay
            continue
        record = parse(line)
        clean = record is not None
        if record is None:
            unreadable.append(number)
        else:
            records.append(record)
            end = offset
    return Lines(records, unreadable, cut, line if cut else b"", end, len(data))


def cut_damaged_end(path: Path, lines: Lines) -> int:
    """Truncate `path` in place at `lines.end` (never rewriting what is kept), so that the next
    appended record starts a line of its own; the bytes dropped."""
    if lines.end < lines.size:
        with open(path, "r+b") as f:
            f.truncate(lines.end)
    return lines.size - lines.end
