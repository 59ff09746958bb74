"""train/run_dir.py: never silently reuse or overwrite an earlier run."""

from __future__ import annotations

import pytest

from crma_jax.train.config import TrainConfig
from crma_jax.train.run_dir import check_run_dir, read_config, write_config


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
