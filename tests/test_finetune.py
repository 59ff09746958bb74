"""End to end: the `crma train` program on a tiny Llama with a character tokenizer.

Covers the run directory's contents, config precedence, exact resume after SIGKILL (after a
committed checkpoint and in the middle of an async save), Ctrl-C, and bad inputs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from conftest import committed_steps, restore_checkpoint
from crma_jax.data import BatchIterator, build_dataset
from crma_jax.pretrained import load_tokenizer
from crma_jax.train import finetune
from crma_jax.train.cli import main
from crma_jax.train.config import TrainConfig, parse_config
from crma_jax.train.finetune import open_session, train
from crma_jax.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
WORDS = "the court shall grant a license to any party under the terms of this agreement and may not revoke it".split()
STEP_KEYS = ("step", "loss", "grad_norm", "tokens", "tokens_per_s", "lr/lora_a", "lr/lora_b", "lr/crma_read_mix",
             "lr/crma_gate", "zclip/mu", "zclip/sigma", "zclip/z", "zclip/clipped", "zclip/skipped",
             "zclip/raw_norm", "zclip/clipped_norm", "crma_spectral_dev", "crma_sinkhorn_residual",
             "crma_alpha", "crma_gain")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """60 short JSONL documents over a 19-word vocabulary: learnable in a few dozen steps."""
    rng = np.random.RandomState(0)
    path = tmp_path_factory.mktemp("ft_data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS, 30))}) + "\n" for _ in range(60)))
    return path


def _argv(model: Path, data: Path, out: Path, *extra: str, fast: bool = True) -> list[str]:
    argv = ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--seq-len", "32",
            "--batch-size", "4", "--lr-lora", "3e-3", "--mesh", "1,1,1"]
    if fast:
        argv += ["--no-plots", "--report-to", "none", "--eval-every", "0"]
    return argv + list(extra)


def _env(**extra: str) -> dict[str, str]:
    """The parent's environment (conftest's XLA_FLAGS with 8 devices included) plus `extra`."""
    return {**os.environ, **extra}


def _data_position(model: Path, data: Path, steps: int) -> dict:
    """The iterator state after `steps` batches of `_argv`'s settings (seq 32, batch 4, seed 0)."""
    train, _ = build_dataset(str(data), load_tokenizer(model), 32, holdout_fraction=0.1, seed=0)
    it = BatchIterator(train, 4, seed=0)
    for _ in range(steps):
        next(it)
    return it.state()


def _assert_trees_equal(a, b) -> None:
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_full_run_writes_every_artifact_and_learns(tiny_lm, data_file, tmp_path, capsys):
    run = tmp_path / "run"
    argv = _argv(tiny_lm, data_file, run, "--steps", "24", "--checkpoint-every", "8", "--eval-every", "8",
                 "--keep-checkpoints", "2", fast=False)
    assert main(argv) == 0
    out, err = capsys.readouterr()
    printed = json.loads(out)
    assert printed["steps"] == 24

    # What the run used, said at its start and recorded: 60 distinct documents, a tenth held out.
    data = printed["data"]
    assert data["documents"] == {"train": 54, "holdout": 6, "duplicates_dropped": 0, "unusable_skipped": 0}
    tok = load_tokenizer(tiny_lm)
    docs = [json.loads(line)["text"] for line in data_file.read_text().splitlines()]
    ids = [tok(d)["input_ids"] for d in docs]
    tokens = sum(len(i) - (i[-1] == tok.eos_token_id) + 1 for i in ids)  # each document and one EOS
    assert data["tokens"]["train"] + data["tokens"]["holdout"] == tokens
    assert data["rows"]["train"] == -(-data["tokens"]["train"] // 32) and data["steps_per_epoch"] == data["rows"]["train"] // 4
    assert f"  train:   54 documents, {data['tokens']['train']} tokens" in err
    assert f"  holdout: 6 documents held out of it, {data['tokens']['holdout']} tokens" in err
    assert f"writing:  {run}/" in err
    assert data["warnings"] and "warning: the holdout has only 6 documents" in err and "--holdout-fraction" in err

    # The effective config: complete, reloadable, and it reproduces the settings given.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    cfg = TrainConfig(**saved)
    assert (cfg.steps, cfg.seq_len, cfg.batch_size, cfg.checkpoint_every, cfg.lr_lora) == (24, 32, 4, 8, 3e-3)
    assert cfg.model == str(tiny_lm) and cfg.data == str(data_file)

    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == list(range(1, 25))
    for r in records:
        missing = [k for k in STEP_KEYS if k not in r]
        assert not missing, f"step {r['step']}: missing {missing}"
        assert np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
        assert len(r["crma_alpha"]) == 2 and len(r["crma_gain"]) == 2  # one per layer
        # ||M||_2 <= 1 by construction; it may fall a little below 1 where Sinkhorn has not converged.
        assert r["crma_spectral_dev"] <= 1e-3
        assert max(r["crma_gain"]) <= 1.0 + 1e-5  # non-expansive
        assert r["zclip/skipped"] == 0
    assert records[0]["crma_spectral_dev"] <= 1e-6  # at init M = sinkhorn(8 I), norm 1
    assert records[-1]["lr/lora_a"] < records[10]["lr/lora_a"]  # cosine decay after warmup

    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    assert [s for s, _ in evals] == [8, 16, 24]
    assert evals[-1][1] < evals[0][1] - 0.1, evals  # it learns: holdout loss falls

    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    for png in ("loss.png", "grad_norm.png", "spectral_norm.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    assert committed_steps(run) == [16, 24]  # only the last `keep_checkpoints`
    step, state, meta = restore_checkpoint(run)
    assert step == 24 and meta["step"] == 24
    assert set(state) == {"trainable", "opt_state", "rng"}
    assert int(state["opt_state"]["zclip"]["count"]) == 24

    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["skipped_steps"] == 0
    assert summary["remat"] == "none"  # --remat auto: a tiny step fits without remat
    assert summary["holdout_loss"] == pytest.approx(evals[-1][1])
    assert summary["final_loss"] == pytest.approx(records[-1]["loss"])


def test_yaml_config_and_flag_precedence(tiny_lm, data_file, tmp_path, capsys):
    run = tmp_path / "run"
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_lm), "data": str(data_file), "out": str(run), "steps": 5, "seq_len": 16,
        "lora_rank": 2, "warmup_steps": 1, "plots": False, "report_to": "none", "eval_every": 0, "mesh": "1,1,1",
    }))
    assert main(["train", "--config", str(config), "--steps=3", "--batch-size=2"]) == 0
    saved = TrainConfig(**yaml.safe_load((run / "config.yaml").read_text()))
    assert saved.steps == 3  # the flag beats the file
    assert saved.seq_len == 16 and saved.lora_rank == 2  # the file beats the defaults
    assert saved.batch_size == 2 and saved.lr_lora == TrainConfig.lr_lora
    assert len(read_metrics(run)) == 3
    _, state, _ = restore_checkpoint(run)
    q_a = state["trainable"]["lora"]["layers"]["self_attn"]["q_proj"]["a"]
    assert q_a.shape[-1] == 2  # lora_rank from the YAML file reached the model
    capsys.readouterr()

    # The same out again: refused without --resume, and with --resume only on the same settings.
    assert main(["train", "--config", str(config), "--steps=3", "--batch-size=2"]) == 2
    assert f"{run}: already holds a run; pass --resume" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--steps=3", "--batch-size=2", "--lr-lora=1e-3", "--resume"]) == 2
    assert "lr_lora: 0.0002 -> 0.001" in capsys.readouterr().err
    assert len(read_metrics(run)) == 3

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"steps": 5, "sequence_length": 16}))
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "bad_run")]) == 2
    err = capsys.readouterr().err
    assert "sequence_length" in err and str(bad) in err
    assert not (tmp_path / "bad_run").exists()


def test_an_unset_warmup_fits_a_short_run_and_a_set_one_is_kept(tmp_path):
    def warmup(*argv: str) -> int:
        return parse_config(["--model", "m", "--data", "d", *argv]).warmup_steps

    assert [warmup("--steps", str(n)) for n in (2, 5, 50, 100, 5000)] == [0, 0, 5, 10, 10]
    assert warmup("--steps", "50", "--warmup-steps", "20") == 20
    config = tmp_path / "c.yaml"
    config.write_text("steps: 40\nwarmup_steps: 30\n")
    assert warmup("--config", str(config)) == 30  # set in the YAML: the user's
    cfg = parse_config(["--model", "m", "--data", "d", "--steps", "2", "--warmup-steps", "10"])
    with pytest.raises(ValueError, match="--warmup-steps 10 must be < --steps 2"):
        cfg.validate()
    with pytest.raises(ValueError, match="--samples must be >= 0, got -1"):
        parse_config(["--model", "m", "--data", "d", "--samples", "-1"]).validate()


def test_yaml_values_of_the_wrong_type_are_refused_before_the_run_is_claimed(tiny_lm, data_file, tmp_path, capsys):
    """YAML 1.1 reads `lr_lora: 1e-3` as the string '1e-3': refused with the key named, before RUN
    exists, so the corrected rerun into the same --out is not refused as a second run."""
    run = tmp_path / "run"
    config = tmp_path / "cfg.yaml"
    common = (f"model: {tiny_lm}\ndata: {data_file}\nout: {run}\nsteps: 2\nseq_len: 16\nwarmup_steps: 1\n"
              "plots: false\nreport_to: none\neval_every: 0\nmesh: '1,1,1'\nbatch_size: 2\n")
    for line, key in (("lr_lora: 1e-3", "lr_lora"), ("lora_rank: '4'", "lora_rank"), ("steps: yes", "steps")):
        config.write_text(common.replace("steps: 2\n", "") + line + "\n" if key == "steps" else common + line + "\n")
        assert main(["train", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert f"{config}: {key}:" in err and "internal error" not in err, err
        assert not run.exists()
    config.write_text(common + "lr_lora: 1.0e-3\nlr_crma_read_mix: 1\n")  # an int where a float is asked is fine
    assert main(["train", "--config", str(config)]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lr_lora"] == 1e-3 and saved["lr_crma_read_mix"] == 1.0 and isinstance(saved["lr_crma_read_mix"], float)


# Two LoRA targets keep the compile short; the mechanics under test do not depend on them.
RESUME = ("--steps", "12", "--checkpoint-every", "4", "--lora-targets", "q_proj,v_proj")


FAULTS = ("after_checkpoint", "during_save")
FAULT_DRIVER = Path(__file__).with_name("fault_injection.py")


@pytest.fixture(scope="module")
def session(tiny_lm, data_file, tmp_path_factory):
    """One loaded model + data for the RESUME config, shared by in-process runs so that the
    compiled step is reused (`train(cfg, session)`, as `crma cl` does across domains)."""
    return open_session(parse_config(_argv(tiny_lm, data_file, tmp_path_factory.mktemp("unused"), *RESUME)[1:]))


def _train(argv: list[str], session) -> dict:
    """`crma train ARGV` in-process on a shared session."""
    return train(parse_config(argv[1:]), session)


@pytest.fixture(scope="module")
def crash_runs(tiny_lm, data_file, tmp_path_factory, session) -> dict[str, tuple[Path, list[str], int, str]]:
    """name -> (run dir, argv, return code, stderr) of subprocess runs SIGKILLed at step 8 through
    the `on_checkpoint` callback (tests/fault_injection.py), one per fault; plus "uninterrupted",
    the same config run in-process to the end."""
    root = tmp_path_factory.mktemp("crash")
    argv = _argv(tiny_lm, data_file, root / "uninterrupted", *RESUME)
    assert _train(argv, session)["steps"] == 12
    out = {"uninterrupted": (root / "uninterrupted", argv, 0, "")}
    for name in FAULTS:
        argv = _argv(tiny_lm, data_file, root / name, *RESUME)
        proc = subprocess.run([sys.executable, str(FAULT_DRIVER), name, "8", "*", "--", *argv], cwd=REPO, env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
        out[name] = (root / name, argv, proc.returncode, proc.stderr)
    return out


@pytest.fixture(scope="module")
def uninterrupted(crash_runs) -> Path:
    return crash_runs["uninterrupted"][0]


def _assert_same_run(run: Path, reference: Path) -> None:
    """Same losses at every step and bitwise the same final training state."""
    got, want = read_metrics(run), read_metrics(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 13))
    for g, w in zip(got, want):
        assert g["loss"] == w["loss"] and g["grad_norm"] == w["grad_norm"], g["step"]
        assert g["lr/lora_a"] == w["lr/lora_a"]
    step, state, meta = restore_checkpoint(run)
    ref_step, ref_state, ref_meta = restore_checkpoint(reference)
    assert step == ref_step == 12 and meta == ref_meta
    _assert_trees_equal(state, ref_state)  # adapters, optimizer + ZClip state, RNG


def test_resume_after_sigkill_is_exact(crash_runs, uninterrupted):
    run, argv, returncode, err = crash_runs["after_checkpoint"]
    assert returncode == -signal.SIGKILL, err[-3000:]
    assert committed_steps(run) == [4, 8]
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 9))
    _, state8, meta8 = restore_checkpoint(run, 8)
    _, ref8, ref_meta8 = restore_checkpoint(uninterrupted, 8)
    assert meta8 == ref_meta8
    _assert_trees_equal(state8, ref8)

    assert main(argv + ["--resume"]) == 0
    _assert_same_run(run, uninterrupted)


def test_sigkill_during_async_save_keeps_previous_checkpoint(crash_runs, uninterrupted, session):
    run, argv, returncode, err = crash_runs["during_save"]
    assert returncode == -signal.SIGKILL, err[-3000:]
    assert committed_steps(run) == [4]  # step 8 never committed (at most a temporary directory is left)
    step, state, meta = restore_checkpoint(run)
    assert step == 4 and meta["step"] == 4
    _, ref4, ref_meta4 = restore_checkpoint(uninterrupted, 4)
    assert meta == ref_meta4
    _assert_trees_equal(state, ref4)

    assert _train(argv + ["--resume"], session)["steps"] == 12
    assert committed_steps(run)[-1] == 12
    _assert_same_run(run, uninterrupted)  # the half-written step 8 did not leak into the resume


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tiny_lm, data_file, tmp_path):
    run = tmp_path / "run"
    argv = _argv(tiny_lm, data_file, run, "--steps", "100000", "--checkpoint-every", "100000", *RESUME[4:])
    # As from a terminal: SIGINT at its default in the child, even when this test process runs
    # as a background job (a non-interactive shell starts `cmd &` with SIGINT ignored, and an
    # ignored signal stays ignored across exec).
    proc = subprocess.Popen([sys.executable, "-m", "crma_jax.train.cli", *argv], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no 3 steps logged in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "stopped by SIGINT at step" in err

    step, state, meta = restore_checkpoint(run)
    logged = [r["step"] for r in read_metrics(run)]
    assert step >= 3 and step == logged[-1] and logged == list(range(1, step + 1))
    # The checkpoint is consistent: it holds exactly `step` updates and the matching data position.
    assert meta["step"] == step
    assert int(state["opt_state"]["zclip"]["count"]) == step
    assert meta["data"] == _data_position(tiny_lm, data_file, step)
    assert not (run / "summary.json").exists()


def test_auto_remat_falls_back_to_the_leanest_policy_when_memory_is_short(tiny_lm, data_file, tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.setattr(finetune, "free_bytes", lambda devices: 1)
    assert main(_argv(tiny_lm, data_file, tmp_path / "run", "--steps", "2", "--warmup-steps", "0")) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["remat"] == "full"
    assert "remat 'full'" in out.err and "does not fit either" in out.err and "tried: none" in out.err


def test_auto_remat_is_recorded_and_a_resumed_run_keeps_it(tiny_lm, data_file, tmp_path, capsys, monkeypatch):
    """--remat auto picks from free memory once; --resume compiles the recorded policy only, even
    when memory now looks different, so a resumed run (or a peer process) runs the same program."""
    run = tmp_path / "run"
    monkeypatch.setattr(finetune, "free_bytes", lambda devices: 1)  # short of memory: "full"
    assert main(_argv(tiny_lm, data_file, run, "--steps", "2", "--warmup-steps", "0", "--checkpoint-every", "1")) == 0
    assert json.loads((run / "remat.json").read_text()) == {"policy": "full"}
    tried = []
    real = finetune.fastest_fitting
    monkeypatch.setattr(finetune, "free_bytes", lambda devices: 1 << 40)  # plenty now: auto would pick "none"
    monkeypatch.setattr(finetune, "fastest_fitting", lambda f, free, policies: tried.append(policies) or real(f, free,
                                                                                                            policies))
    capsys.readouterr()
    assert main(_argv(tiny_lm, data_file, run, "--steps", "2", "--warmup-steps", "0", "--checkpoint-every", "1",
                      "--resume")) == 0
    assert tried == [("full",)] and json.loads(capsys.readouterr().out)["remat"] == "full"


def test_each_process_measures_only_its_own_devices(tiny_lm, data_file, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(finetune, "free_bytes", lambda devices: seen.append(list(devices)) or 1 << 40)
    assert main(_argv(tiny_lm, data_file, tmp_path / "run", "--steps", "1", "--warmup-steps", "0")) == 0
    assert seen and all(d.process_index == jax.process_index() for devices in seen for d in devices)


def test_auto_remat_is_agreed_with_the_other_processes():
    """Two processes, simulated by the answers of the collective `gather` (process order): each
    plans for the least free memory of any, and all run process 0's pick."""
    from types import SimpleNamespace

    from crma_jax.memory_plan import REMAT_BY_SPEED

    need = {p: 100 - 20 * i for i, p in enumerate(REMAT_BY_SPEED)}  # MiB per step, leanest last
    compiled = []

    def compile_for(policy):
        compiled.append(policy)
        mib = need[policy] << 20
        return SimpleNamespace(memory_analysis=lambda: SimpleNamespace(temp_size_in_bytes=mib, output_size_in_bytes=0,
                                                                        alias_size_in_bytes=0))

    def gather_with(peer: dict[str, int], me: int):
        answers = iter([peer["free_mib"], peer["pick"]])

        def gather(value):  # both processes' values, in process order
            theirs = next(answers)
            return [value, theirs] if me == 0 else [theirs, value]
        return gather

    plenty, lean = 1 << 40, REMAT_BY_SPEED[-1]
    # The peer has 1 MiB free: this process (0), with plenty, plans for it and picks the leanest.
    choice = finetune.agreed_choice(compile_for, REMAT_BY_SPEED, plenty, gather_with({"free_mib": 1, "pick": 0}, me=0))
    assert choice.policy == lean and not choice.fits
    # This process (1) would run the fastest; process 0 picked the leanest: it runs that one.
    compiled.clear()
    choice = finetune.agreed_choice(compile_for, REMAT_BY_SPEED, plenty,
                                    gather_with({"free_mib": plenty >> 20, "pick": len(REMAT_BY_SPEED) - 1}, me=1))
    assert choice.policy == lean and compiled == [REMAT_BY_SPEED[0], lean]


@pytest.mark.parametrize("what", ["missing_data", "empty_data", "missing_model"])
def test_bad_input_exits_2_naming_the_path(what, tiny_lm, data_file, tmp_path, capsys):
    run = tmp_path / "run"
    model, data = tiny_lm, data_file
    if what == "missing_data":
        data = tmp_path / "nope.jsonl"
        culprit = data
    elif what == "empty_data":
        data = tmp_path / "empty.txt"
        data.write_text("")
        culprit = data
    else:
        model = tmp_path / "no_such_model"
        culprit = model
    assert main(_argv(model, data, run, *RESUME)) == 2
    err = capsys.readouterr().err
    assert str(culprit) in err, err
    # Nothing of a run is left behind (an empty run directory at most).
    if run.exists():
        assert not list(run.iterdir()), sorted(p.name for p in run.iterdir())


def test_a_missing_data_file_is_named_before_the_model_loads(tiny_lm, tmp_path, capsys, monkeypatch):
    loaded = []
    monkeypatch.setattr(finetune, "load_pretrained", lambda *args, **kwargs: loaded.append(args))
    for flags in (["--data", str(tmp_path / "nope.jsonl")], ["--data", "legal", "--eval-data", "./held.jsonl"]):
        argv = ["train", "--model", str(tiny_lm), "--out", str(tmp_path / "run"), *flags]
        assert main(argv) == 2
        assert f"{flags[-1].lstrip('./')}: no such file or directory" in capsys.readouterr().err
    assert not loaded and not (tmp_path / "run").exists()


def test_a_sample_generation_that_fails_loses_nothing_of_the_run(tiny_lm, data_file, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no decode path for this model")

    monkeypatch.setattr(finetune, "holdout_samples", broken)
    run = tmp_path / "run"
    assert main(_argv(tiny_lm, data_file, run, "--steps", "2", "--warmup-steps", "0")) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["samples_error"] == "RuntimeError: no decode path for this model" and "samples" not in summary
    assert (run / "adapters").is_dir() and summary["steps"] == 2
    assert "warning: no sample generations (RuntimeError: no decode path" in capsys.readouterr().err
