"""crma_jax.distributed in one process: launch planning, cluster detection, per-process rows.

The real multi-process runs are in tests/test_multiprocess.py.
"""

from __future__ import annotations

import importlib.util

import jax
import numpy as np
import pytest

from crma_jax import distributed
from crma_jax.distributed import Launch, detect_cluster, global_batch, local_rows, to_host
from crma_jax.sharding import make_mesh
from crma_jax.train_step import batch_sharding

SLURM_TWO_TASKS = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_NODELIST": "n[1-2]",
                   "SLURM_STEP_NUM_TASKS": "2"}


def test_clusters_are_detected_only_with_more_than_one_task(monkeypatch):
    monkeypatch.setitem(distributed.CLUSTERS, "Cloud TPU", lambda env: False)  # this machine may have libtpu
    assert detect_cluster({}) is None
    assert detect_cluster(SLURM_TWO_TASKS) == "SLURM"
    assert detect_cluster({**SLURM_TWO_TASKS, "SLURM_STEP_NUM_TASKS": "1"}) is None  # one srun task
    assert detect_cluster({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}) == "Open MPI"
    assert detect_cluster({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "1"}) is None


def test_cloud_tpu_needs_tpu_chips_beside_libtpu(monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "libtpu" else find_spec(name, *a))
    assert not distributed._cloud_tpu({}, dev=tmp_path)  # a `[tpu]` install on a machine without TPUs
    (tmp_path / "vfio").mkdir()
    (tmp_path / "vfio" / "vfio").touch()  # the vfio control node alone is not a chip
    assert not distributed._cloud_tpu({}, dev=tmp_path)
    (tmp_path / "vfio" / "0").touch()
    assert distributed._cloud_tpu({}, dev=tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else find_spec(name, *a))
    assert not distributed._cloud_tpu({}, dev=tmp_path)


def test_launch_plan_from_flags_environment_and_mode(monkeypatch):
    monkeypatch.setitem(distributed.CLUSTERS, "Cloud TPU", lambda env: False)
    assert Launch().plan({}) is None
    assert Launch("off").plan(SLURM_TWO_TASKS) is None
    assert Launch().plan(SLURM_TWO_TASKS) == "SLURM"
    assert Launch("on").plan({}) == "on"
    assert Launch("auto", "localhost:1234", 2, 1).plan({}) == "flags"
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert Launch().resolved(env) == Launch("auto", "h:1", 4, 3)
    assert Launch("auto", "", None, 0).resolved(env).process_id == 0  # a flag beats the environment
    assert Launch("auto", "localhost:1234", 1, 0).plan({}) is None  # one process of one
    assert Launch("on", "localhost:1234", 1, 0).plan({}) == "on"  # "on" always joins


@pytest.mark.parametrize("launch, message", [
    (Launch("sometimes"), "--distributed must be one of"),
    (Launch("auto", "localhost:1234"), "needs all three"),
    (Launch("auto", "localhost:1234", 2, 2), r"--process-id must be in \[0, 2\)"),
    (Launch("auto", "localhost:1234", 0, 0), "--num-processes must be >= 1"),
])
def test_bad_launch_settings_are_named(launch, message):
    with pytest.raises(ValueError, match=message):
        launch.plan({})


def test_bad_environment_is_named():
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer"):
        Launch().plan({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"})


def test_initialize_without_a_plan_starts_nothing():
    assert distributed.initialize(Launch("off")) is None
    assert not jax.distributed.is_initialized() and jax.process_count() == 1
    assert distributed.is_writer() and distributed.describe() == "process 0/1"
    distributed.sync("no-op in one process")


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_one_process_holds_every_row_and_global_batch_is_the_batch(shape):
    mesh = make_mesh(shape)
    sharding = batch_sharding(mesh)
    assert local_rows(sharding, 8) == slice(0, 8)
    rows = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    out = global_batch({"input_ids": rows}, sharding, 8)["input_ids"]
    assert out.sharding == sharding
    np.testing.assert_array_equal(to_host(out), rows)
    # Each device's shard is its slice of the rows: the layout a multi-process run assembles.
    for shard in out.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), rows[shard.index])
