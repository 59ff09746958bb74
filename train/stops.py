"""Stop signals: a run stops between steps, saves, and says how to continue.

SIGINT (Ctrl-C), SIGTERM (what SLURM, Kubernetes and preemptible cloud VMs send before they kill)
and SIGUSR1 (SLURM's `--signal=USR1@SECONDS`) do not interrupt anything while `deferred()` is
active: the handler only records the signal. The training loop calls `agreed()` at each step
boundary, and at the end of each start-up phase; when any process has received a signal, every
process gets its number at the same point, saves a checkpoint and raises `Stopped`. The command
line then exits with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), and `--resume`
continues exactly.

A signal never interrupts a jit'ed step (its donated buffers would be gone), a save (Orbax could
be left without its thread pool), or JAX's start-up (where a KeyboardInterrupt has crashed the
process). A second signal only says that the run is already stopping; a third Ctrl-C is the
escape hatch, and stops at once without a checkpoint (the last committed one stays usable,
because Orbax renames a checkpoint into place only when it is complete).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Any, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []
_installed: list[int] = []  # the signals whose handler `deferred` replaced
_depth = 0


class Stopped(Exception):
    """A stop signal took effect at a step boundary, after the run saved its state."""

    def __init__(self, signum: int, where: str) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _handler(signum: int, frame: Any) -> None:
    _received.append(signum)
    if len(_received) == 1:
        return
    if signum == signal.SIGINT and _received.count(signal.SIGINT) >= 3:
        raise KeyboardInterrupt  # the escape hatch: stop now, without a checkpoint
    print(f"already stopping on {signal.Signals(_received[0]).name}: finishing the step and its checkpoint "
          f"(Ctrl-C three times stops at once, without one)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block, a stop signal is only recorded (see the module docstring). Re-entrant:
    the outermost block installs the handlers and puts the previous ones back. Off the main
    thread it does nothing (Python delivers signals to the main thread only)."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    if _depth == 0:
        _received.clear()
        for s in STOP_SIGNALS:
            if signal.getsignal(s) is not signal.SIG_IGN:  # `nohup` and friends ignore some on purpose
                previous[s] = signal.signal(s, _handler)
        _installed[:] = list(previous)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if _depth == 0:
            _installed.clear()


def reinstall() -> None:
    """Put the deferring handlers back after something replaced them below Python: joining a
    multi-process run (`jax.distributed.initialize`) installs JAX's own SIGTERM handler (its
    preemption notifier), which would swallow the signal. Call it after joining."""
    if threading.current_thread() is threading.main_thread():
        for s in _installed:
            signal.signal(s, _handler)


def pending() -> int:
    """The first stop signal this process received inside `deferred()`, or 0."""
    return _received[0] if _received else 0


def agreed() -> int:
    """The stop signal that any process received (0 if none). A collective: every process of a
    multi-process run must call it at the same point, so that all stop at the same step."""
    from crma_jax import distributed  # here, so that `crma -h` (which imports Stopped) needs no jax

    return max(distributed.gather(pending()))


def check(where: str) -> None:
    """Raise `Stopped` if any process received a stop signal (a collective, like `agreed`); for
    points where there is nothing to save yet, e.g. between start-up phases."""
    signum = agreed()
    if signum:
        raise Stopped(signum, where)
