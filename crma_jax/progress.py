"""Progress on long work: a tqdm bar on a terminal; in a log, a plain line now and then.

When stderr is not a terminal (a batch job, `cmd 2> log`, CI), a bar would fill the log with
carriage-return redraws. There, `bar` prints one line such as "train: 20/60 steps (33%), 41 s,
loss=2.61" at most every `EVERY_S` seconds and once at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm import tqdm

EVERY_S = 30.0


class LineProgress:
    """The part of tqdm's interface the programs use (`update`, `set_postfix`, `close`, iteration),
    as plain lines on stderr: at most one per `every_s` seconds, and one when it closes (with
    `leave=False`, as for a bar that vanishes when done, only if it printed before)."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, every_s: float = EVERY_S, leave: bool = True) -> None:
        self.iterable, self.total, self.desc, self.unit, self.leave = iterable, total, desc, unit, leave
        self.n, self.every_s, self.postfix = initial, every_s, ""
        self._start = self._last = time.monotonic()
        self._shown = initial

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.every_s:
            self._line()

    def close(self) -> None:
        if self.n != self._shown and (self.leave or self._last > self._start):
            self._line()

    def _line(self) -> None:
        self._last, self._shown = time.monotonic(), self.n
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        extra = f", {self.postfix}" if self.postfix else ""
        units = self.unit + ("es" if self.unit.endswith(("s", "ch", "sh", "x")) else "s")
        print(f"{self.desc}: {count} {units}{share}, {self._last - self._start:.0f} s{extra}", file=sys.stderr,
              flush=True)


def bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
        initial: int = 0, disable: bool = False, leave: bool = True) -> Any:
    """A tqdm bar on a terminal, `LineProgress` otherwise; nothing at all with `disable`."""
    if disable or sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, leave=leave,
                    dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave)


def progress_callback(desc: str, unit: str = "tensor") -> Callable[[Iterator[Any], int], Iterable[Any]]:
    """A `progress(items, total)` callback (for `load_pretrained`, `evaluate`) that shows `bar`."""
    return lambda items, total: bar(items, total=total, desc=desc, unit=unit, leave=False)
