"""Multi-process (multi-controller) JAX: one process per host, one global mesh.

Three concerns, each a small function:

- **Launch** (`initialize`): start `jax.distributed` when the run is one of several processes,
  from explicit settings (`Launch`: coordinator, process count and id, from flags or the
  `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` environment) or, with no
  settings, when JAX can detect the cluster itself (`detect_cluster`: SLURM, Open MPI, a Cloud
  TPU VM). On CPU the cross-process collectives are gloo's.
- **Data per process** (`local_rows`, `global_batch`): every process holds the same packed rows
  and the same iterator position; each materialises only the rows of each global batch that
  its own devices hold, and `jax.make_array_from_process_local_data` joins them into one array.
- **One writer** (`is_writer`, `sync`, `to_host`): process 0 alone writes files; `sync` is a
  barrier; `to_host` brings any array, sharded across processes or not, to every process.

In one process every function here is the identity or a no-op, so single-process code and
multi-process code are the same code.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from crma_jax.host import tpu_chips

MODES = ("auto", "on", "off")
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def _slurm(env: Mapping[str, str]) -> bool:
    # One SLURM task is a single-process run; JAX's detector needs these variables (srun sets them).
    keys = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST")
    return all(k in env for k in keys) and int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1


def _open_mpi(env: Mapping[str, str]) -> bool:
    return "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def _cloud_tpu(env: Mapping[str, str], dev: Path = Path("/dev")) -> bool:
    # A TPU VM has libtpu (the `jax[tpu]` install) and TPU chips as device nodes; JAX then reads
    # the slice's hosts from the VM's metadata. libtpu alone (a `[tpu]` install on a machine
    # without TPUs) is no cluster.
    return tpu_chips(dev) and importlib.util.find_spec("libtpu") is not None


# The clusters whose settings `jax.distributed.initialize()` finds by itself, and how we tell
# that we are in one (without starting anything).
CLUSTERS = {"SLURM": _slurm, "Open MPI": _open_mpi, "Cloud TPU": _cloud_tpu}


def detect_cluster(env: Mapping[str, str] | None = None) -> str | None:
    """The name of the cluster environment JAX can initialise from (a key of CLUSTERS), or None."""
    env = os.environ if env is None else env
    return next((name for name, present in CLUSTERS.items() if present(env)), None)


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins a multi-process run.

    mode: "auto" (join when settings are given or a cluster is detected), "on" (always call
      `jax.distributed.initialize`, letting JAX detect the rest) or "off" (one process);
    coordinator: "host:port" of process 0's coordinator service; num_processes, process_id:
      this run's process count and this process's index. Empty/None: from the environment.
    """

    mode: str = "auto"
    coordinator: str = ""
    num_processes: int | None = None
    process_id: int | None = None

    def resolved(self, env: Mapping[str, str] | None = None) -> Launch:
        """The same launch with unset settings taken from the JAX_* environment variables."""
        env = os.environ if env is None else env

        def number(value: int | None, key: str) -> int | None:
            if value is not None or key not in env:
                return value
            try:
                return int(env[key])
            except ValueError:
                raise ValueError(f"environment variable {key} must be an integer, got {env[key]!r}") from None

        return Launch(self.mode, self.coordinator or env.get(ENV_COORDINATOR, ""),
                      number(self.num_processes, ENV_NUM_PROCESSES), number(self.process_id, ENV_PROCESS_ID))

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--distributed must be one of {', '.join(MODES)}, got {self.mode!r}")
        given = [bool(self.coordinator), self.num_processes is not None, self.process_id is not None]
        if any(given) and not all(given):
            raise ValueError("a multi-process launch needs all three of --coordinator-address, --num-processes and "
                             "--process-id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); got "
                             f"coordinator={self.coordinator or None}, num_processes={self.num_processes}, "
                             f"process_id={self.process_id}")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"--num-processes must be >= 1, got {self.num_processes}")
        if self.num_processes is not None and not 0 <= (self.process_id or 0) < self.num_processes:
            raise ValueError(f"--process-id must be in [0, {self.num_processes}), got {self.process_id}")

    def plan(self, env: Mapping[str, str] | None = None) -> str | None:
        """Why this process would join a multi-process run ("flags", a cluster's name, "on"), or
        None for a single-process run. Pure: starts nothing."""
        launch = self.resolved(env)
        launch.validate()
        if launch.mode == "off":
            return None
        if launch.mode == "on":
            return "on"
        if launch.coordinator:
            return "flags" if launch.num_processes != 1 else None
        return detect_cluster(env)


def initialize(launch: Launch, env: Mapping[str, str] | None = None) -> str | None:
    """Join the multi-process run `launch` describes (`Launch.plan`), before any JAX computation;
    returns the plan (None: single process). Idempotent: a second call in a process that has
    already joined does nothing."""
    why = launch.plan(env)
    if why is None or jax.distributed.is_initialized():
        return why
    launch = launch.resolved(env)
    # CPU devices of different processes talk through gloo; the setting is ignored by GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if launch.coordinator:
        kwargs = {"coordinator_address": launch.coordinator, "num_processes": launch.num_processes,
                  "process_id": launch.process_id}
    jax.distributed.initialize(**kwargs)
    return why


def is_writer() -> bool:
    """True in the one process that writes files: process 0."""
    return jax.process_index() == 0


def describe() -> str:
    """"process i/n" (this process's index and the count) for log lines."""
    return f"process {jax.process_index()}/{jax.process_count()}"


def sync(name: str) -> None:
    """A barrier across every process (no-op in one process): nobody passes `name` before all reach it."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def gather(value: int) -> list[int]:
    """Every process's `value` (an int32-sized int), in process order: a collective that every
    process must reach; [value] in one process."""
    if jax.process_count() == 1:
        return [int(value)]
    from jax.experimental import multihost_utils

    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.asarray(value, np.int32))).ravel()]


def any_process(flag: bool) -> bool:
    """Whether `flag` is true in any process (a collective; the flag itself in one process), so
    that every process takes the same branch, e.g. stopping on a Ctrl-C that reached only some."""
    return max(gather(int(bool(flag)))) > 0


def to_host(x: Any) -> np.ndarray:
    """A jax.Array as a NumPy array of its global value, on every process, whether it is sharded
    across processes (gathered), replicated (the local copy) or on this process alone."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(sharding: NamedSharding, global_rows: int) -> slice:
    """The contiguous rows of a (global_rows, ...) batch that this process's devices hold under
    `sharding` (a batch split along its first axis): all of them in one process."""
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map((global_rows,)).values():
        rows = index[0]
        starts.append(rows.start or 0)
        stops.append(global_rows if rows.stop is None else rows.stop)
    lo, hi = min(starts), max(stops)
    if sum(b - a for a, b in set(zip(starts, stops))) != hi - lo:
        raise ValueError(f"{sharding}: this process's rows of the batch are not contiguous")
    return slice(lo, hi)


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding, global_rows: int) -> dict[str, jax.Array]:
    """One global (global_rows, T) jax.Array per key from this process's rows (`local_rows`)."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_rows, *v.shape[1:]))
            for k, v in local.items()}
