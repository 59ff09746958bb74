"""End to end: `crma train` and `crma cl` as 2 real processes of 4 CPU devices each, on JAX's
distributed runtime with gloo collectives on localhost, against the same run in 1 process of 8
devices.

The commands are the README's ("Beyond one machine"). Every launch is bounded by a timeout, and
every process a test starts is killed (its whole process group) before the test returns.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import committed_steps, word_jsonl
from crma_jax.train.config import parse_config
from crma_jax.train.finetune import train
from crma_jax.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
FAULT_DRIVER = REPO / "tests" / "fault_injection.py"
WORDS = "a clause may bind each party to the terms that the court reads into the contract"
STEPS, KILL_AT = 8, 4
LAUNCH_TIMEOUT = 600  # a hang guard: loaded 2-core CI machines run a launch in minutes

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return word_jsonl(tmp_path_factory.mktemp("mp_data") / "docs.jsonl", WORDS, rows=60, length=30)


def _argv(model: Path, data: Path, out: Path, mesh: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", str(STEPS),
            "--seq-len", "32", "--batch-size", "8", "--lr-lora", "3e-3", "--warmup-steps", "2", "--zclip-warmup", "3",
            "--mesh", mesh, "--checkpoint-every", str(KILL_AT), "--eval-every", str(KILL_AT), "--no-plots",
            "--report-to", "none"]


def _command(argv: list[str], kill_at: int | None) -> list[str]:
    """`crma ARGV`, or the fault driver that SIGKILLs the process once checkpoint `kill_at` is committed."""
    if kill_at is None:
        return [sys.executable, "-m", "crma_jax.train.cli", *argv]
    return [sys.executable, str(FAULT_DRIVER), "after_checkpoint", str(kill_at), "*", "--", *argv]


def _launch(argv: list[str], processes: int, kill_at: dict[int, int] | None = None,
            sigterm: tuple[int, Path] | None = None) -> list[tuple[int, str, str]]:
    """Run `crma ARGV` as `processes` processes of 8 / processes CPU devices each (the README's
    launch); `kill_at[i]` SIGKILLs process i after that checkpoint; `sigterm = (i, run)` sends
    SIGTERM to process i alone once RUN/metrics.jsonl logs a step. When a process fails, the rest
    are killed, as a cluster scheduler tears a job down (a stop by SIGTERM is not a failure).
    Returns (return code, stdout, stderr) per process."""
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}"}
    procs, logs = [], []
    try:
        for i in range(processes):
            flags = ["--coordinator-address", f"localhost:{port}", "--num-processes", str(processes),
                     "--process-id", str(i)] if processes > 1 else ["--distributed", "off"]
            # Files, not pipes: nobody reads a pipe while the processes run, and gloo is chatty.
            logs.append((tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")))
            procs.append(subprocess.Popen(_command(argv + flags, (kill_at or {}).get(i)), cwd=REPO, env=env,
                                          stdout=logs[-1][0], stderr=logs[-1][1], text=True, start_new_session=True))
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                tails = []
                for i, (_, err) in enumerate(logs):
                    err.seek(0)
                    lines = [line for line in err.read().splitlines() if "cudart" not in line and "absl" not in line]
                    tails.append(f"process {i}, last lines of stderr:\n" + "\n".join(lines[-15:]))
                raise TimeoutError(f"{argv}: still running after {LAUNCH_TIMEOUT} s\n" + "\n".join(tails))
            if sigterm and (sigterm[1] / "metrics.jsonl").is_file() and (sigterm[1] / "metrics.jsonl").read_text():
                procs[sigterm[0]].send_signal(signal.SIGTERM)
                sigterm = None
            if any(p.poll() not in (None, 0, 128 + signal.SIGTERM) for p in procs):
                time.sleep(1.0)  # a peer died: tear the job down
                for p in procs:
                    if p.poll() is None:
                        os.killpg(p.pid, signal.SIGKILL)
            time.sleep(0.01 if sigterm else 0.2)
        results = []
        for p, files in zip(procs, logs):
            texts = []
            for f in files:
                f.seek(0)
                texts.append(f.read())
            results.append((p.returncode, *texts))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for files in logs:
            for f in files:
                f.close()


def _check(results: list[tuple[int, str, str]]) -> None:
    for i, (code, _, err) in enumerate(results):
        assert code == 0, f"process {i} exited with {code}:\n{err[-4000:]}"


def _assert_same_trajectory(run: Path, reference: Path) -> None:
    got, want = read_metrics(run), read_metrics(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for g, w in zip(got, want):
        for key in ("loss", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=1e-5), (g["step"], key)
        if "eval_loss" in w:
            assert g["eval_loss"] == pytest.approx(w["eval_loss"], rel=1e-5), g["step"]


@pytest.fixture(scope="module")
def runs(tiny_lm, data_file, tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted single-process (8 devices, in this process) references, one per mesh."""
    root = tmp_path_factory.mktemp("mp")
    out = {}
    for mesh in ("2,2,2", "8,1,1"):
        run = root / f"single_{mesh.replace(',', '')}"
        assert train(parse_config(_argv(tiny_lm, data_file, run, mesh)[1:] + ["--distributed", "off"]))["steps"] == STEPS
        out[mesh] = run
    return out


@pytest.mark.parametrize("mesh", ["2,2,2", "8,1,1"])
def test_two_processes_follow_the_single_process_trajectory(runs, tiny_lm, data_file, tmp_path, mesh):
    run = tmp_path / "two"
    results = _launch(_argv(tiny_lm, data_file, run, mesh), 2)
    _check(results)
    _assert_same_trajectory(run, runs[mesh])
    # Each process logs its index; both report the same holdout loss (evaluated across both).
    summaries = [json.loads(out[out.index("{"):]) for _, out, _ in results]
    assert summaries[0]["holdout_loss"] == summaries[1]["holdout_loss"]
    for i, (_, _, err) in enumerate(results):
        assert f"process {i}/2" in err
    # One writer: one metrics line per step, and process 1 drew no progress bar.
    assert len((run / "metrics.jsonl").read_text().splitlines()) == STEPS
    assert f"{STEPS}/{STEPS}" in results[0][2] and f"{STEPS}/{STEPS}" not in results[1][2]


def test_sigkill_of_one_process_then_resume_in_two_or_one_process(runs, tiny_lm, data_file, tmp_path):
    """Process 1 dies after checkpoint 4; the job is torn down. The committed checkpoint resumes
    both as 2 processes and, from a copy, as 1 process; both continuations equal the
    uninterrupted run."""
    run = tmp_path / "killed"
    argv = _argv(tiny_lm, data_file, run, "2,2,2")
    results = _launch(argv, 2, kill_at={1: KILL_AT})
    assert results[1][0] == -signal.SIGKILL, results[1][2][-3000:]
    assert results[0][0] != 0  # torn down (or failed on its lost peer), never finished
    assert committed_steps(run) == [KILL_AT]
    copy = tmp_path / "killed_copy"
    shutil.copytree(run, copy)

    _check(_launch(argv + ["--resume"], 2))
    _assert_same_trajectory(run, runs["2,2,2"])

    _check(_launch(_argv(tiny_lm, data_file, copy, "2,2,2") + ["--resume"], 1))
    _assert_same_trajectory(copy, runs["2,2,2"])


def test_sigterm_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(runs, tiny_lm, data_file, tmp_path):
    """SIGTERM reaches process 1 only (a scheduler that signals one task): both processes agree
    at the next step boundary, save that step together and exit with 143; two processes resume
    it exactly."""
    run = tmp_path / "stopped"
    argv = _argv(tiny_lm, data_file, run, "8,1,1")
    results = _launch(argv, 2, sigterm=(1, run))
    for i, (code, _, err) in reversed(list(enumerate(results))):
        assert code == 128 + signal.SIGTERM, f"process {i} exited with {code}:\n{err[-3000:]}"
    step = committed_steps(run)[-1]
    assert 1 <= step < STEPS and [r["step"] for r in read_metrics(run)] == list(range(1, step + 1))
    assert all(f"stopped by SIGTERM at step {step} " in err for _, _, err in results)
    _check(_launch(argv + ["--resume"], 2))
    _assert_same_trajectory(run, runs["8,1,1"])


def test_a_single_process_checkpoint_resumes_in_two_processes(runs, tiny_lm, data_file, tmp_path):
    run = tmp_path / "one_then_two"
    argv = _argv(tiny_lm, data_file, run, "8,1,1")
    results = _launch(argv, 1, kill_at={0: KILL_AT})
    assert results[0][0] == -signal.SIGKILL, results[0][2][-3000:]
    assert committed_steps(run) == [KILL_AT]
    _check(_launch(argv + ["--resume"], 2))
    _assert_same_trajectory(run, runs["8,1,1"])


def test_continual_learning_in_two_processes_reaches_the_single_process_numbers(tiny_lm, data_file, tmp_path):
    """`crma cl` over two domains with the methods that gather statistics over the data between
    domains (EWC's Fisher, InfLoRA's input Gram matrices) and route without a task id: the loss
    matrices of 2 processes equal those of 1 process on the same 8 devices."""
    other = word_jsonl(tmp_path / "other.jsonl", "the function returns a list of the values it reads from the file",
                       rows=60, length=30)

    def argv(out: Path) -> list[str]:
        return ["cl", "--model", str(tiny_lm), "--domains", f"law={data_file},code={other}",
                "--conditions", "ewc,inflora", "--steps", "3", "--warmup-steps", "1", "--seq-len", "32",
                "--batch-size", "8", "--lr-lora", "3e-3", "--mesh", "8,1,1", "--fisher-batches", "2",
                "--routing-tokens", "8", "--no-plots", "--report-to", "none", "--out", str(out)]
    _check(_launch(argv(tmp_path / "one"), 1))
    _check(_launch(argv(tmp_path / "two"), 2))
    want = json.loads((tmp_path / "one" / "results.json").read_text())["results"]
    got = json.loads((tmp_path / "two" / "results.json").read_text())["results"]
    for method in ("ewc", "inflora"):
        for key in ("L", "base"):
            np.testing.assert_allclose(got[method]["0"][key], want[method]["0"][key], rtol=1e-5, err_msg=method)
        assert got[method]["0"]["agnostic"]["acc"] == pytest.approx(want[method]["0"]["agnostic"]["acc"], rel=1e-5)
