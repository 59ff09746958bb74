"""End to end: the faults a cluster sends to `crma train`, each injected from outside the program.

Stop signals (SIGTERM, SIGUSR1, a second signal while stopping) at a step chosen at random, and
during start-up; a second run started into the same directory; a newest checkpoint that is
truncated or has garbage metadata; a metrics line cut short; `--resume` with nothing to resume
from. After each, the run either finishes exactly like an undisturbed one, or refuses with a
message that names the directory.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import committed_steps, restore_checkpoint, word_jsonl
from crma_jax.train.checkpointing import ASIDE
from crma_jax.train.cli import main
from crma_jax.train.metrics import read_metrics
from crma_jax.train.run_dir import LOCK_FILE

REPO = Path(__file__).resolve().parents[1]
STEPS = 60  # enough steps that a signal lands inside the loop, few enough to rerun in seconds
WORDS = "the court shall grant a license to any party under the terms of this agreement and may not revoke it"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return word_jsonl(tmp_path_factory.mktemp("fault_data") / "docs.jsonl", WORDS, rows=60, length=30)


def _argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--seq-len", "32",
            "--batch-size", "4", "--lr-lora", "3e-3", "--mesh", "1,1,1", "--steps", str(STEPS),
            "--checkpoint-every", "20", "--keep-checkpoints", "3", "--lora-targets", "q_proj,v_proj",
            "--no-plots", "--report-to", "none", "--eval-every", "0", *extra]


@pytest.fixture(scope="module")
def reference(tiny_lm, data_file, tmp_path_factory) -> Path:
    """The undisturbed run every faulted one must reproduce."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(_argv(tiny_lm, data_file, run)) == 0
    return run


def _assert_same_run(run: Path, reference: Path) -> None:
    """Every step's loss and the final training state (adapters, optimizer, RNG) bit for bit."""
    got, want = read_metrics(run), read_metrics(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    step, state, meta = restore_checkpoint(run)
    ref_step, ref_state, ref_meta = restore_checkpoint(reference)
    assert step == ref_step == STEPS and meta == ref_meta
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert (run / "adapters").is_dir() and (run / "summary.json").is_file()


def _start(argv: list[str]) -> subprocess.Popen:
    # As from a terminal or a scheduler: every stop signal at its default in the child, even when
    # this test runs as a background job (which starts with SIGINT ignored).
    return subprocess.Popen([sys.executable, "-m", "crma_jax.train.cli", *argv], cwd=REPO, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_until(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in time"
        time.sleep(0.01)


def _logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def _finish(proc: subprocess.Popen) -> str:
    try:
        return proc.communicate(timeout=180)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("signals", [("SIGTERM",), ("SIGUSR1", "SIGTERM")], ids=["sigterm", "sigusr1-then-sigterm"])
def test_a_stop_signal_at_a_random_step_saves_that_step_and_resume_is_exact(signals, tiny_lm, data_file, reference,
                                                                           tmp_path):
    run = tmp_path / "run"
    argv = _argv(tiny_lm, data_file, run)
    at = random.Random(" ".join(signals)).randint(2, STEPS // 2)
    proc = _start(argv)
    _wait_until(proc, lambda: _logged(run) >= at, f"step {at}")
    for name in signals:  # a second signal arrives while the first one's checkpoint is being saved
        proc.send_signal(getattr(signal, name))
    err = _finish(proc)
    first = getattr(signal, signals[0])
    assert proc.returncode == 128 + first, err[-3000:]
    assert f"stopped by {signals[0]} at step" in err
    assert "\r" not in err and "train: " in err  # a log, not a terminal: progress as plain lines
    if len(signals) > 1:
        assert "already stopping on SIGUSR1" in err
    step, state, meta = restore_checkpoint(run)
    logged = [r["step"] for r in read_metrics(run)]
    assert at <= step < STEPS and logged == list(range(1, step + 1))  # the step it stopped at, saved
    assert meta["step"] == step and int(state["opt_state"]["zclip"]["count"]) == step
    assert not (run / "summary.json").exists() and (run / LOCK_FILE).read_text() == ""  # released cleanly

    assert main(argv + ["--resume"]) == 0
    _assert_same_run(run, reference)


def test_a_stop_signal_during_start_up_exits_cleanly_and_the_run_can_start_again(tiny_lm, data_file, reference,
                                                                                tmp_path):
    run = tmp_path / "run"
    argv = _argv(tiny_lm, data_file, run)
    proc = _start(argv)
    # The run has locked its directory and is now loading the model or compiling.
    _wait_until(proc, lambda: (run / LOCK_FILE).exists() and (run / LOCK_FILE).read_text(), "the lock")
    proc.send_signal(signal.SIGTERM)
    err = _finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]  # not a crash, not a signal death
    assert "stopped by SIGTERM while" in err
    if run.exists():  # stopped while compiling: its config is written, and nothing else of note
        assert not (run / "metrics.jsonl").exists() and not committed_steps(run)
    assert main(argv + ["--resume"]) == 0  # nothing was lost, so there is nothing to refuse
    _assert_same_run(run, reference)


def test_a_second_run_in_the_same_directory_is_refused_naming_the_first(tiny_lm, data_file, tmp_path, capsys):
    run = tmp_path / "run"
    argv = _argv(tiny_lm, data_file, run, "--steps", "100000", "--checkpoint-every", "100000")
    proc = _start(argv)
    try:
        _wait_until(proc, lambda: _logged(run) >= 2, "two steps")
        assert main(argv) == 2 and main(argv + ["--resume"]) == 2
        assert capsys.readouterr().err.count(f"run: in use by PID {proc.pid} on ") == 2
    finally:
        proc.kill()  # SIGKILL: no checkpoint, and the lock file still names it
        proc.wait()
    # Its lock is taken over, and since it logged steps but saved none, --resume refuses to
    # start over them.
    assert main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert f"taking over the lock of PID {proc.pid}" in err
    assert "--resume found no checkpoint to continue from, but metrics.jsonl records" in err


def _truncate_largest_file(checkpoint: Path) -> None:
    largest = max((p for p in checkpoint.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])


def _garbage_metadata(checkpoint: Path) -> None:
    (checkpoint / "meta" / "metadata").write_bytes(b"\x00garbage{")


@pytest.mark.parametrize("damage", [_truncate_largest_file, _garbage_metadata], ids=["truncated", "garbage-meta"])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_resume_falls_back(damage, tiny_lm, data_file, reference,
                                                                          tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for partial_output in ("summary.json", "adapters"):  # as if killed right after the last save
        shutil.rmtree(run / partial_output) if (run / partial_output).is_dir() else (run / partial_output).unlink()
    damage(run / "checkpoints" / str(STEPS))
    assert main(_argv(tiny_lm, data_file, run, "--resume")) == 0
    err = capsys.readouterr().err
    assert f"checkpoints/{STEPS}: checkpoint of step {STEPS} does not restore (" in err
    assert (run / ASIDE / str(STEPS)).is_dir()  # kept for a post-mortem, out of Orbax's sight
    _assert_same_run(run, reference)  # retrained from the checkpoint before, to the same state


def test_a_cut_metrics_line_does_not_block_resume(tiny_lm, data_file, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "summary.json").unlink()
    shutil.rmtree(run / "adapters")
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 61, "loss": 2.' + b"\x00" * 100)  # a disk full in the middle of a line
    assert main(_argv(tiny_lm, data_file, run, "--resume")) == 0
    assert "metrics.jsonl: dropped 123 unreadable bytes" in capsys.readouterr().err
    _assert_same_run(run, reference)
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS


def test_a_disk_that_refuses_the_checkpoint_is_one_line_and_resume_continues(tiny_lm, data_file, reference, tmp_path):
    import resource

    run = tmp_path / "run"
    argv = _argv(tiny_lm, data_file, run)
    # Files may not grow past 32 KiB in the child: config and metrics fit, Orbax's checkpoint
    # metadata (about 60 KB) does not, as on a full disk. Python ignores SIGXFSZ, so the write
    # fails with EFBIG.
    limit = 32 << 10
    # (Nor may it write to the run's shared compilation cache, where it would leave cut entries.)
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
    proc = subprocess.run([sys.executable, "-m", "crma_jax.train.cli", *argv], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    # Orbax saves asynchronously: the failure of step 20's save surfaces at a later save or at the end.
    assert re.fullmatch(rf"crma train: error: {re.escape(str(run / 'checkpoints'))}: saving a checkpoint failed by "
                        r"step (20|40|60) \(.*File too large.*\); none was committed: make room, then run again with "
                        r"--resume", last), last
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr  # no Orbax thread dumps
    assert not committed_steps(run)
    # No checkpoint was committed, and 20 steps were logged: --resume says so rather than
    # silently starting over them.
    assert main(argv + ["--resume"]) == 2
