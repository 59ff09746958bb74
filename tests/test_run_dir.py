"""train/run_dir.py: never silently reuse or overwrite an earlier run."""

from __future__ import annotations

import pytest
import yaml

from crma_jax.train.config import TrainConfig, current_names, parse_config
from crma_jax.train.run_dir import (COMMITTED, STAGING, check_run_dir, commit, read_config, recover, settings_of,
                                    write_config)


def test_new_or_empty_directories_are_accepted(tmp_path):
    check_run_dir(tmp_path / "new", TrainConfig(), resume=False)
    (tmp_path / "empty").mkdir()
    check_run_dir(tmp_path / "empty", TrainConfig(), resume=False)
    check_run_dir(tmp_path / "new", TrainConfig(), resume=True)  # nothing to resume: a fresh run


def test_a_non_empty_directory_needs_resume(tmp_path):
    write_config(tmp_path / "run", TrainConfig())
    with pytest.raises(FileExistsError, match=r"run: already holds a run; pass --resume"):
        check_run_dir(tmp_path / "run", TrainConfig(), resume=False)
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no config.yaml"):
        check_run_dir(tmp_path / "stranger", TrainConfig(), resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        check_run_dir(tmp_path / "file", TrainConfig(), resume=True)


def test_resume_names_every_setting_that_changes_results(tmp_path):
    run = tmp_path / "run"
    write_config(run, TrainConfig(lr_lora=1e-3, steps=10))
    check_run_dir(run, TrainConfig(lr_lora=1e-3, steps=10), resume=True)
    # Where and how a run is written or logged may change on resume.
    check_run_dir(run, TrainConfig(lr_lora=1e-3, steps=10, plots=False, checkpoint_every=7, eval_every=3,
                                   out="elsewhere"), resume=True)
    with pytest.raises(ValueError) as err:
        check_run_dir(run, TrainConfig(lr_lora=3e-3, steps=12), resume=True)
    msg = str(err.value)
    assert "lr_lora: 0.001 -> 0.003" in msg and "steps: 10 -> 12" in msg and "config.yaml" in msg
    assert read_config(run)["lr_lora"] == 1e-3  # the check wrote nothing
    # A run saved before a setting existed resumes when the setting keeps its default.
    saved = read_config(run)
    del saved["eval_data"]
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "tensorboard": True}))
    check_run_dir(run, TrainConfig(lr_lora=1e-3, steps=10), resume=True)
    with pytest.raises(ValueError, match=r"eval_data: '' -> 'held.jsonl'"):
        check_run_dir(run, TrainConfig(lr_lora=1e-3, steps=10, eval_data="held.jsonl"), resume=True)


def test_a_run_saved_under_renamed_settings_resumes_and_reads_under_the_new_names(tmp_path):
    run = tmp_path / "run"
    saved = settings_of(TrainConfig(use_crma=False, lr_crma_read_mix=3e-2))
    old = {("crma" if k == "use_crma" else "lr_crma_mix" if k == "lr_crma_read_mix" else k): v for k, v in saved.items()}
    assert "crma" in old and "use_crma" not in old
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    check_run_dir(run, TrainConfig(use_crma=False, lr_crma_read_mix=3e-2), resume=True)
    with pytest.raises(ValueError, match=r"use_crma: False -> True"):
        check_run_dir(run, TrainConfig(lr_crma_read_mix=3e-2), resume=True)
    back = read_config(run, TrainConfig)
    assert back["use_crma"] is False and back["lr_crma_read_mix"] == 3e-2 and "crma" not in back
    assert list(back)[:3] == list(saved)[:3]  # renamed keys keep their place


def test_renamed_settings_answer_to_their_old_flags_and_yaml_keys(tmp_path):
    assert parse_config(["--no-crma", "--lr-crma-mix", "3e-2"]) == parse_config(["--no-crma", "--lr-crma-read-mix", "3e-2"])
    assert parse_config(["--no-crma"]).use_crma is False and parse_config([]).use_crma is True
    old = tmp_path / "old.yaml"
    old.write_text("crma: false\nlr_crma_mix: 3.0e-2\n")
    cfg = parse_config(["--config", str(old)])
    assert cfg.use_crma is False and cfg.lr_crma_read_mix == 3e-2
    assert current_names({"crma": False, "use_crma": True}) == {"use_crma": True}  # the new name wins


def _state(root):
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _write(version):
    def write(staging):
        (staging / "progress.json").write_text(version)
        (staging / "adapters").mkdir()
        (staging / "adapters" / "meta.json").write_text(version)
    return write


def test_commit_replaces_entries_as_one_and_recover_finishes_or_drops_a_cut_one(tmp_path):
    root = tmp_path / "seed0"
    root.mkdir()
    (root / "keep.txt").write_text("other")
    commit(root, _write("1"))
    old = {"adapters/meta.json": "1", "keep.txt": "other", "progress.json": "1"}
    assert _state(root) == old
    # Killed while writing: the staged entries never committed, so the old ones stay.
    def dies(staging):
        _write("2")(staging)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        commit(root, dies)
    recover(root)
    assert _state(root) == old
    # Killed after the commit point, half moved in: recovery moves in the rest.
    (root / COMMITTED).mkdir()
    _write("2")(root / COMMITTED)
    (root / COMMITTED / "progress.json").replace(root / "progress.json")
    assert _state(root)["progress.json"] == "2" and _state(root)["adapters/meta.json"] == "1"  # the mix
    recover(root)
    assert _state(root) == {"adapters/meta.json": "2", "keep.txt": "other", "progress.json": "2"}
    assert not (root / COMMITTED).exists() and not (root / STAGING).exists()


def test_one_writer_per_run_directory_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    import os
    import subprocess
    import sys

    from crma_jax.train.run_dir import LOCK_FILE, RunInUse, RunLock

    run = tmp_path / "run"
    first = RunLock.acquire(run)
    # flock belongs to the open file: a second acquire fails even from the same process.
    with pytest.raises(RunInUse, match=rf"run: in use by PID {os.getpid()} on .*; wait for that run to end"):
        RunLock.acquire(run)
    check_run_dir(run, TrainConfig(), resume=False)  # the lock file alone does not make a run
    first.release()
    assert not run.exists()  # created by the lock and nothing else written: no trace left
    first.release()  # idempotent

    # A holder that dies keeps its note in the file; the kernel drops its lock, so it is taken over.
    run.mkdir()
    code = ("import sys, os; from crma_jax.train.run_dir import RunLock; RunLock.acquire(sys.argv[1]); "
            "os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(run)], check=True)
    assert (run / LOCK_FILE).read_text().startswith("PID ")
    lock = RunLock.acquire(run)
    assert "ended without releasing it" in capsys.readouterr().err
    (run / "config.yaml").write_text("{}")
    lock.release()
    assert (run / LOCK_FILE).read_text() == ""  # a clean release: the next holder says nothing
    RunLock.acquire(run).release()
    assert "without releasing" not in capsys.readouterr().err
